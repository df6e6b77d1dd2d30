"""Accuracy evaluation of Prism on real pretrained models and real data (docs/accuracy.md).

Everything here runs offline from the cache that
`benchmarks/accuracy/fetch_data.sh` fills (``$PRISM_CACHE``, default
``~/.cache/prism-kernels``): data loaders (`data`), model loading and conversion
(`models`), linear probes (`probe`), metrics (`metrics`), the resumable result
store (`store`), the task definitions and CR sweeps (`tasks`), tables and plots
(`report`) and fine-tuning with Prism in the loop (`finetune`).
"""
