"""Models loaded in threads at once (the pipeline's units): transformers swaps class attributes while it loads
(``PreTrainedModel.tie_weights`` becomes a no-op, then is put back); unserialised, two loads can leave the no-op in
place for good, and every later load of a tied model leaves its lm_head on the meta device."""

import threading

from transformers.modeling_utils import PreTrainedModel

from lsq.models import ModelConfig, load_base_model
from tests.lsq.tiny import tiny_llama  # noqa: F401 - fixture


def test_loads_in_threads_at_once_leave_transformers_intact_and_tie_the_head(tiny_llama):  # noqa: F811
    tie = PreTrainedModel.tie_weights
    cfg = ModelConfig(name=str(tiny_llama), task="causal_lm", device="cpu")
    loaded, failed = [], []

    def load():
        try:
            loaded.append(load_base_model(cfg))
        except Exception as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    for _ in range(3):
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert PreTrainedModel.tie_weights is tie  # without lsq.models.LOAD_LOCK: broken in the first round
    assert not failed and len(loaded) == 12
    later = load_base_model(cfg)
    assert later.lm_head.weight is later.model.embed_tokens.weight and not later.lm_head.weight.is_meta
