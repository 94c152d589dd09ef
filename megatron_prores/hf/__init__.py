"""Hugging Face side: the model class shipped inside exports (configuration_prores.py and
modeling_prores.py are copied verbatim next to the weights and loaded with trust_remote_code)."""
