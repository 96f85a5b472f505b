"""Serving: the runtime as a component of a service, a layer above the engines and the core runtime.

- ``service``: ``UpscalerService``, a pool of ``Upscaler`` workers behind a bounded queue;
- ``tile_batch``: tiles of many requests in one engine batch (what a dynamic batcher merges);
- ``triton_models``: the two Triton models ``esrdf-serve`` binds, and their I/O contract;
- ``serve``: ``esrdf-serve``, the runtime behind Triton Inference Server through PyTriton;
- ``triton_bls``: the Python-backend model that ``esrdf.export.triton_repo`` writes into a repository.
"""
