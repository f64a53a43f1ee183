"""The demo workloads of `kernelloop up --demo`: RMSNorm whose usage shifts to a new shape (demo.py),
and a Llama-style decoder stack on kernelloop's ops (llama.py) or transformers' patched
(hf_llama.py) serving shifting traffic (llama_demo.py)."""
