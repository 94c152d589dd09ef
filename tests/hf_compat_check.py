"""Checks of an exported Hugging Face directory against reference values of the Megatron model.

Needs torch and transformers only, so that it also runs under another transformers release:
``python tests/hf_compat_check.py DIR...`` checks each DIR against DIR/expected.pt (written by
tests/test_hf_export.py) and prints one line per DIR; exit status 1 when any check fails.

expected.pt holds: format (the model class the directory must load as), tokens [b, s] and their
Megatron logits (float64), labels (tokens with some -100) and the loss HF defines for them (mean
cross entropy of logits[:, :-1] against labels[:, 1:]), prompts (1-D, of different lengths) and
greedy (each prompt followed by Megatron's greedy continuation of new_tokens tokens).
"""

import sys

import torch
import transformers

LOGITS_TOL = 1e-4  # fp32 export vs fp32 Megatron (the folded Llama differs by the epsilon effect, ~1e-5)
PAD = 0


def greedy(model, ids, n, use_cache, attention_mask=None):
    return model.generate(ids, attention_mask=attention_mask, max_new_tokens=n, do_sample=False,
                          use_cache=use_cache, pad_token_id=PAD, eos_token_id=None)


@torch.no_grad()
def check(directory, expected):
    """The max |logit diff| to Megatron's; raises AssertionError naming the first check that fails."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True)
    model.eval()
    assert type(model).__name__ == expected["format"], (type(model).__name__, expected["format"])
    assert model.dtype == torch.float32, model.dtype

    logits = model(expected["tokens"]).logits.double()
    assert logits.shape == expected["logits"].shape, (logits.shape, expected["logits"].shape)
    diff = (logits - expected["logits"]).abs().max().item()
    assert diff < LOGITS_TOL, f"max |logits - Megatron's| = {diff:.3e}"
    loss = model(expected["tokens"], labels=expected["labels"]).loss.item()
    assert abs(loss - expected["loss"]) < LOGITS_TOL, f"loss {loss} != {expected['loss']} (from Megatron's logits)"

    n = expected["new_tokens"]
    for use_cache in (True, False):
        for prompt, want in zip(expected["prompts"], expected["greedy"]):
            got = greedy(model, prompt[None], n, use_cache)[0]
            assert torch.equal(got, want), f"use_cache={use_cache}, prompt {prompt.tolist()}: {got.tolist()} " \
                                           f"!= Megatron's {want.tolist()}"
        # the prompts left-padded into one batch: each row continues as it does alone
        width = max(len(p) for p in expected["prompts"])
        ids = torch.full((len(expected["prompts"]), width), PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(expected["prompts"]):
            ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
        out = greedy(model, ids, n, use_cache, attention_mask=mask)
        for r, (p, want) in enumerate(zip(expected["prompts"], expected["greedy"])):
            got = out[r, width - len(p):]
            assert torch.equal(got, want), f"left-padded batch, use_cache={use_cache}, row {r}: {got.tolist()} " \
                                           f"!= alone (Megatron's) {want.tolist()}"
    return diff


def main(directories):
    print(f"transformers {transformers.__version__} from {transformers.__file__.rsplit('/transformers/', 1)[0]}")
    failed = 0
    for d in directories:
        try:
            diff = check(d, torch.load(f"{d}/expected.pt", weights_only=True))
            print(f"ok {d} (max |logit diff| {diff:.1e})")
        except Exception as e:  # report every directory, not only the first failure
            failed += 1
            print(f"FAILED {d} (transformers {transformers.__version__}): {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
