"""Library behind the Triton model repository.

Every ``model_repository/*/1/model.py`` is a thin adapter over this package, so the logic
here is tested without a server. Nothing in this package imports
``triton_python_backend_utils`` except :mod:`serving.triton`, which only runs inside a
Python-backend stub (or under the fake in ``tests/conftest.py``).
"""
