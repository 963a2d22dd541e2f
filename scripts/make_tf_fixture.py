"""Write the tiny OpenAI-layout TensorFlow checkpoints under tests/fixtures/openai_tiny/ with real TensorFlow.

They let the tests check ``igpt.weights.tfbundle`` (our TensorFlow-free reader) against files that TensorFlow itself
wrote, with the variable names and shapes of the released image-gpt checkpoints (reference igpt.md section 6):
``model/wte`` [V, d], ``model/wpe`` [T, d], ``model/sos`` [d] (AR only), ``model/wtet`` [V, d],
``model/h{i}/ln_1/g``, ``model/h{i}/attn/{q,k,v,c}_proj`` [H, d/H, d], ``model/h{i}/mlp/c_fc/w`` [d, 4d],
``model/h{i}/mlp/c_proj/w`` [4d, d], ``model/ln_f/g``, plus Adam slot variables, ``beta1_power`` /
``beta2_power`` and an int64 ``global_step``, as a training job would leave them.

The graph is a TF1 graph (``tf.compat.v1``) saved by ``tf.compat.v1.train.Saver(sharded=True)``. Variables
are spread over two CPU devices, so the saver writes two ``.data-0000i-of-00002`` shards like the released
32- and 64-shard files. One Adam step runs before saving so the slots are not all zero. Each fixture folder
also gets ``expected.npz`` (every saved variable as TensorFlow returns it, names with '/' as '|') and a
``kmeans_centers.npy`` palette of V colours in [-1, 1].

TensorFlow is needed only to run this script, never by igpt or its tests. Run it in a throwaway venv:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
    /tmp/tfvenv/bin/python scripts/make_tf_fixture.py --out tests/fixtures/openai_tiny
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

# Tiny shapes: d 8, 2 heads, 2 layers, 4x4 pixels, 16 colours; the two files stay around ten KB each.
SHAPES = {"ar": dict(n_embd=8, n_head=2, n_layer=2, n_px=4, n_vocab=16, step=131000),
          "bert": dict(n_embd=8, n_head=2, n_layer=1, n_px=4, n_vocab=16, step=262000)}


def release_variables(n_embd: int, n_head: int, n_layer: int, n_px: int, n_vocab: int,
                      with_sos: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float32 values under the released names and shapes; gains near 1 like a trained model."""
    d, hd = n_embd, n_embd // n_head
    shapes = {"model/wte": (n_vocab, d), "model/wpe": (n_px * n_px, d), "model/wtet": (n_vocab, d),
              "model/ln_f/g": (d,)}
    if with_sos:
        shapes["model/sos"] = (d,)
    for i in range(n_layer):
        p = f"model/h{i}/"
        shapes.update({p + "ln_1/g": (d,), p + "ln_2/g": (d,), p + "mlp/c_fc/w": (d, 4 * d),
                       p + "mlp/c_proj/w": (4 * d, d)})
        for proj in ("q_proj", "k_proj", "v_proj", "c_proj"):
            shapes[p + "attn/" + proj] = (n_head, hd, d)
    out = {}
    for name, shape in shapes.items():
        offset = 1.0 if name.endswith("/g") else 0.0
        out[name] = (offset + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    return out


def write_checkpoint(folder: Path, shape: dict[str, int], with_sos: bool, seed: int) -> None:
    import tensorflow as tf  # only this script needs TensorFlow

    tf1 = tf.compat.v1
    tf1.disable_eager_execution()
    rng = np.random.default_rng(seed)
    values = release_variables(shape["n_embd"], shape["n_head"], shape["n_layer"], shape["n_px"],
                               shape["n_vocab"], with_sos, rng)
    graph = tf.Graph()
    with graph.as_default():
        variables = []
        for k, (name, value) in enumerate(sorted(values.items())):
            # Alternate devices: the sharded saver writes one data file per device.
            with tf.device(f"/cpu:{k % 2}"):
                variables.append(tf1.get_variable(name, initializer=tf.constant(value)))
        with tf.device("/cpu:0"):
            global_step = tf1.get_variable("global_step", initializer=tf.constant(shape["step"] - 1, tf.int64),
                                           trainable=False)
        # Adam slots for a few variables only (it keeps the fixture small; the released files hold them for
        # every variable): a squared-norm loss over those, one step.
        slotted = [v for v in variables if v.op.name in ("model/wte", "model/ln_f/g", "model/h0/ln_1/g")]
        loss = tf.add_n([tf.reduce_sum(tf.square(v)) for v in slotted])
        train = tf1.train.AdamOptimizer(1e-3).minimize(loss, global_step=global_step, var_list=slotted)
        saver = tf1.train.Saver(sharded=True)
        config = tf1.ConfigProto(device_count={"CPU": 2})
        with tf1.Session(graph=graph, config=config) as sess:
            sess.run(tf1.global_variables_initializer())
            sess.run(train)
            saver.save(sess, str(folder / "model.ckpt"), global_step=shape["step"], write_meta_graph=False)
            saved = {v.op.name: sess.run(v) for v in tf1.global_variables()}
    (folder / "checkpoint").unlink(missing_ok=True)  # the text pointer file; the reader takes a prefix
    np.savez_compressed(folder / "expected.npz", **{k.replace("/", "|"): v for k, v in saved.items()})
    centers = rng.uniform(-1, 1, size=(shape["n_vocab"], 3)).astype(np.float32)
    np.save(folder / "kmeans_centers.npy", centers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/fixtures/openai_tiny", help="fixture folder to (re)write")
    args = parser.parse_args()
    root = Path(args.out)
    for k, (kind, shape) in enumerate(SHAPES.items()):
        folder = root / kind
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_checkpoint(folder, shape, with_sos=(kind == "ar"), seed=k)
        files = sorted(p.name for p in folder.iterdir())
        print(f"{folder}: {', '.join(files)} ({sum(p.stat().st_size for p in folder.iterdir())} bytes)")


if __name__ == "__main__":
    main()
