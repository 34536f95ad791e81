"""Integrations with model libraries. Each is an optional extra, imported on demand:

    kvkernels.integrations.transformers   attn_implementation="kvkernels" and a paged Cache for
                                          Hugging Face transformers (pip install 'kvkernels[transformers]')
"""
