"""The streaming LLaMA writer (models/llama_writer.py), at a small size: a valid model whose weights
all live in its external data file, that ONNX Runtime runs and graphprune prunes by heads and neurons."""

from __future__ import annotations

import numpy as np
import onnx

import graphprune
from graphprune import runtime
from graphprune.models.llama_writer import write_llama


def test_small_llama_is_written_streamed_valid_and_prunable(tmp_path) -> None:
    path = tmp_path / "llama.onnx"
    params = write_llama(path, layers=2, hidden=64, heads=4, ffn=128, vocab=100)
    assert params == 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 2 * 100 * 64 + 64
    assert (tmp_path / "llama.onnx.data").stat().st_size == 4 * params  # every weight is external
    onnx.checker.check_model(str(path))
    model = graphprune.load_model(path)
    outputs = runtime.run(model.to_onnx(), {"input_ids": np.arange(10, dtype=np.int64).reshape(2, 5)})
    assert outputs[0].shape == (2, 5, 100) and np.all(np.isfinite(outputs[0]))
    kinds = sorted(g.kind for g in graphprune.inspect(model).prunable)
    assert kinds.count("head") == 2 and kinds.count("neuron") == 2
    report = graphprune.prune(model, ratio=0.5)
    stats = next(p.stats for p in report.passes if p.name == "prune-units")
    # per layer: 2 of 4 heads (Q/K/V lose 32 columns, O 32 rows) and 64 of 128 neurons (gate/up 64
    # columns, down 64 rows)
    assert report.verified and stats["params_removed"] == 2 * (3 * 64 * 32 + 32 * 64 + 2 * 64 * 64 + 64 * 64)


def test_external_save_keeps_shape_integers_inline(tmp_path) -> None:
    """Saved with every weight external (as sessions of huge models are), the ReduceMean axes and
    Reshape targets stay in the model file, where ONNX Runtime's shape inference reads them."""
    import onnxruntime as ort

    path = tmp_path / "llama.onnx"
    write_llama(path, layers=1, hidden=32, heads=2, ffn=64, vocab=50)
    saved = graphprune.save_model(graphprune.load_model(path), tmp_path / "out" / "m.onnx", external=True)
    proto = onnx.load(str(saved), load_external_data=False)
    inline = {t.name for t in proto.graph.initializer if not onnx.external_data_helper.uses_external_data(t)}
    assert {"last_axis", "to_heads", "from_heads"} <= inline
    assert "lm_head.weight" not in inline
    session = ort.InferenceSession(str(saved))
    assert session.run(None, {"input_ids": np.zeros((1, 3), np.int64)})[0].shape == (1, 3, 50)
