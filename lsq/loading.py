"""Loading a transformers model safely: one load at a time per process, and without the messages that mislead.

transformers 5 swaps class attributes while it loads a model (``initialization.no_tie_weights`` and
``no_init_weights`` replace ``PreTrainedModel.tie_weights`` / ``init_weights`` and torch's init functions with
no-ops, then put back what they found). Two loads at once in threads (the pipeline's units) can put back a no-op
for good: every later load in the process then ties nothing, and a tied lm_head stays on the meta device
("Cannot copy out of meta tensor"). Every model lsq loads goes through :func:`from_pretrained` (or holds
:data:`LOAD_LOCK`).
"""

from __future__ import annotations

import logging
import threading
import warnings

_HELD = threading.local()
LOAD_LOCK = threading.Lock()  # one model load at a time per process: see the module's docstring


class _HoldLoadReport(logging.Filter):
    """On transformers' model-loading logger: a load report logged while this thread is inside
    :func:`from_pretrained` with ``new_head`` is kept in ``_HELD.records`` instead of printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        held = getattr(_HELD, "records", None)
        if held is None or "LOAD REPORT" not in str(record.msg):
            return True
        held.append(record)
        return False


def from_pretrained(auto, path: str, new_head: bool = False, **kwargs):
    """``auto.from_pretrained(path, **kwargs)`` without the messages that mislead.

    - ``new_head``: the classification head is new by design, so transformers' load report lists its
      weights as MISSING on every load (training, scoring, loading the registered model). The report is
      shown only when it says more: missing weights outside the head, unexpected or mismatched ones,
      or a load that failed.
    - PEFT reads ``is_gradient_checkpointing``, deprecated in transformers 5, when it wraps the model:
      that FutureWarning (this message only, process-wide) is silenced.
    """
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    with LOAD_LOCK:  # one load at a time: see LOAD_LOCK
        return _load(auto, path, new_head, **kwargs)


def _load(auto, path: str, new_head: bool, **kwargs):
    if not new_head:
        return auto.from_pretrained(path, **kwargs)
    log = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, _HoldLoadReport) for f in log.filters):
        log.addFilter(_HoldLoadReport())
    held: list[logging.LogRecord] = []
    _HELD.records, expected = held, False
    try:
        model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
        base = f"{model.base_model_prefix}."  # missing keys outside the base model are the new head's
        expected = not (info["unexpected_keys"] or info["mismatched_keys"]
                        or any(key.startswith(base) for key in info["missing_keys"]))
    finally:
        _HELD.records = None
        if not expected:
            for record in held:
                log.handle(record)
    return model
