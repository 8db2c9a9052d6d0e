"""Write a LLaMA-style decoder as ONNX with external data, one weight at a time, so a model of about
a billion parameters (~4 GB fp32) is written without ever holding it in memory: each tensor is drawn,
appended to `NAME.onnx.data` and dropped before the next.

    python -m graphprune.models.llama_writer OUT.onnx [--layers 16] [--hidden 2048] [--heads 16]
        [--ffn 5632] [--vocab 32000] [--seed 0]

The defaults give 16 layers x (4 x 2048^2 attention + 3 x 2048 x 5632 SwiGLU + 2 x 2048 norm
gains) plus 2 x 32000 x 2048 embeddings and head and a final norm: 953,223,168 parameters. Graph per layer: RMSNorm (ReduceMean of squares,
Sqrt, Div, Mul), Q/K/V MatMuls, reshapes to heads, scaled softmax attention, output projection,
residual Add, RMSNorm, SwiGLU MLP (gate * Sigmoid(gate) * up, down projection), residual Add.
Inputs: int64 `input_ids` [batch, seq]; output: float `logits` [batch, seq, vocab].
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


class _Weights:
    """Appends tensors to one external-data file and returns initializers that point into it."""

    def __init__(self, path: Path, seed: int) -> None:
        self.path = path
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by `close`
        self.offset = 0
        self.rng = np.random.default_rng(seed)
        self.initializers: list[TensorProto] = []
        self.params = 0

    def add(self, name: str, shape: tuple[int, ...], scale: float | None = None, fill: float | None = None) -> str:
        if fill is not None:
            array = np.full(shape, fill, np.float32)
        else:
            std = scale if scale is not None else 1.0 / math.sqrt(shape[0])
            array = (self.rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
        data = array.tobytes()
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
        self.handle.write(data)
        self.offset += len(data)
        self.params += array.size
        self.initializers.append(tensor)
        return name

    def small(self, name: str, values: np.ndarray) -> str:
        """A small constant stored inside the model file (shapes, scalars)."""
        self.initializers.append(onnx.numpy_helper.from_array(values, name))
        return name

    def close(self) -> None:
        self.handle.close()


def write_llama(out: Path, layers: int = 16, hidden: int = 2048, heads: int = 16, ffn: int = 5632,
                vocab: int = 32000, seed: int = 0) -> int:
    """Write the model to `out` (+ `out.data`); returns the parameter count."""
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    head_dim = hidden // heads
    out = Path(out)
    weights = _Weights(out.with_name(out.name + ".data"), seed)
    nodes: list[onnx.NodeProto] = []
    eps = weights.small("eps", np.array(1e-6, np.float32))
    two = weights.small("two", np.array(2.0, np.float32))
    scale = weights.small("attn_scale", np.array(1.0 / math.sqrt(head_dim), np.float32))
    to_heads = weights.small("to_heads", np.array([0, 0, heads, head_dim], np.int64))
    from_heads = weights.small("from_heads", np.array([0, 0, hidden], np.int64))
    axes = weights.small("last_axis", np.array([-1], np.int64))

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def rms_norm(x: str, prefix: str) -> str:
        gain = weights.add(f"{prefix}.weight", (hidden,), fill=1.0)
        sq = node("Pow", [x, two], f"{prefix}.sq")
        mean = node("ReduceMean", [sq, axes], f"{prefix}.mean", keepdims=1)
        root = node("Sqrt", [node("Add", [mean, eps], f"{prefix}.eps")], f"{prefix}.rms")
        return node("Mul", [node("Div", [x, root], f"{prefix}.normed"), gain], f"{prefix}.out")

    embed = weights.add("embed_tokens.weight", (vocab, hidden), scale=0.02)
    x = node("Gather", [embed, "input_ids"], "embedded", axis=0)
    for i in range(layers):
        p = f"layers.{i}"
        h = rms_norm(x, f"{p}.input_norm")
        projected = {}
        for role in ("q", "k", "v"):
            w = weights.add(f"{p}.self_attn.{role}_proj.weight", (hidden, hidden))
            mm = node("MatMul", [h, w], f"{p}.{role}")
            shaped = node("Reshape", [mm, to_heads], f"{p}.{role}.heads")
            perm = [0, 2, 3, 1] if role == "k" else [0, 2, 1, 3]
            projected[role] = node("Transpose", [shaped], f"{p}.{role}.t", perm=perm)
        scores = node("Mul", [node("MatMul", [projected["q"], projected["k"]], f"{p}.qk"), scale], f"{p}.scores")
        probs = node("Softmax", [scores], f"{p}.probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, projected["v"]], f"{p}.ctx")], f"{p}.ctx.t", perm=[0, 2, 1, 3])
        merged = node("Reshape", [ctx, from_heads], f"{p}.merged")
        wo = weights.add(f"{p}.self_attn.o_proj.weight", (hidden, hidden))
        x = node("Add", [x, node("MatMul", [merged, wo], f"{p}.attn_out")], f"{p}.attn_res")
        h = rms_norm(x, f"{p}.post_norm")
        gate = node("MatMul", [h, weights.add(f"{p}.mlp.gate_proj.weight", (hidden, ffn))], f"{p}.gate")
        up = node("MatMul", [h, weights.add(f"{p}.mlp.up_proj.weight", (hidden, ffn))], f"{p}.up")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.sig")], f"{p}.silu")
        act = node("Mul", [silu, up], f"{p}.act")
        down = node("MatMul", [act, weights.add(f"{p}.mlp.down_proj.weight", (ffn, hidden))], f"{p}.down")
        x = node("Add", [x, down], f"{p}.out")
    x = rms_norm(x, "norm")
    node("MatMul", [x, weights.add("lm_head.weight", (hidden, vocab), scale=0.02)], "logits")
    weights.close()
    graph = helper.make_graph(
        nodes, "llama", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        weights.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="graphprune")
    model.ir_version = 9
    onnx.save(model, str(out))  # the graph only: every big tensor already points into out.data
    return weights.params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = write_llama(args.output, args.layers, args.hidden, args.heads, args.ffn, args.vocab, args.seed)
    print(f"wrote {args.output} and {args.output.name}.data: {params:,} parameters")


if __name__ == "__main__":
    main()
