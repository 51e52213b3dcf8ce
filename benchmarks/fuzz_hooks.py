"""Schemathesis hooks: the few rules of valid requests that an OpenAPI schema cannot state.

Loaded by ``st run`` through ``SCHEMATHESIS_HOOKS=benchmarks.fuzz_hooks`` (see
:mod:`benchmarks.fuzz`). Each hook touches only the cases schemathesis generates as *valid*
(positive mode), so that what it calls valid is what the service accepts; the invalid
cases it generates are left as they are.

* An infer request's ``shape`` is ``[n]`` with n the number of ``data`` elements.
* A filter's exact label names must be labels of the model (the schema cannot list a
  model's labels; the service answers 422 naming the unknown ones): valid cases use
  prefixes (``name*``), which may match nothing.

(``threshold: "auto"`` needs a model built with ``--tune-threshold``, else 422: the fuzzed
bundles are built so.)
"""

from __future__ import annotations

from typing import Any

import schemathesis


def _positive(case: Any) -> bool:
    return case.meta is not None and case.meta.generation.mode.is_positive


def _consistent_shape(body: Any) -> None:
    for tensor in body.get("inputs") or []:
        if isinstance(tensor, dict) and isinstance(tensor.get("data"), list):
            tensor["shape"] = [len(tensor["data"])]


def _known_labels_only(body: Any) -> None:
    spec = body.get("filter")
    if isinstance(spec, dict):
        for key in ("include", "exclude"):
            entries = spec.get(key)
            if isinstance(entries, list):
                spec[key] = [e if not isinstance(e, str) or e.endswith("*") else f"{e}*"
                             for e in entries]  # fmt: skip


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    if _positive(case) and isinstance(case.body, dict):
        if case.operation.path.endswith("/infer"):
            _consistent_shape(case.body)
        elif "/predict" in case.operation.path:
            _known_labels_only(case.body)
    return case
