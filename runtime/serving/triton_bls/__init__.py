"""The Triton Python-backend (BLS) model that ``esrdf.export.triton_repo`` copies into a model repository.

``model.py`` is both package data (its text is written to ``<repo>/esrdf/1/model.py``) and an importable
module, so its request handling is tested against the in-process runtime without a Triton server.
"""
