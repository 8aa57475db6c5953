"""Would per-row bin widths pay in RIQ? (issue 19: "per-output-channel bin widths from row norms ... compare against
per-tensor"). MiniLM, torch form, nearest rounding, D=0.005 on 64 wiki training samples: the k search with each
row's bin width scaled by its norm relative to the tensor's root-mean-square row norm (the tensor's mean width
kept; rotation invariance per row), for the embeddings only or every 2-D tensor, against RIQ's one width per
tensor. Prints k, the codes' entropy (bits/weight; the per-row widths' own storage, ~1% of the file, not
counted), calibration and held-out cosine (128 wiki held-out samples). An estimate: no file is written.

    python benchmarks/riq_row_bins.py tensor|rows-emb|rows-all
"""
import copy
import sys
import time

import numpy as np
import torch

torch.set_num_threads(2)
from compress import data, models
from compress.passes import riq
from compress.runtime import TorchRunner, batches

mode = sys.argv[1]  # tensor | rows-emb | rows-all
model, tok, _ = models.load_hf(models.alias_path("minilm"))
model.eval()
d = data.load("wiki")
feeds = list(batches(tok, d.train[:64], 128))
evalf = list(batches(tok, d.eval[:128], 128))
m = copy.deepcopy(model)
run = TorchRunner(m, "encoder")


def outputs(fs=feeds):
    return np.concatenate([run(f) for f in fs])


ref_eval = outputs(evalf)
params = {n: t for n, t in riq.torch_tensors(m).items() if t.is_floating_point() and riq.eligible(n, t.detach().numpy())}


def apply(weights):
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(torch.from_numpy(w))


originals = {n: t.detach().numpy().copy() for n, t in params.items()}


class RowSearch(riq.Search):
    def quantized(self, k):
        weights, deltas, codes = {}, {}, {}
        for name, w in self.originals.items():
            base = riq.bin_width(self.norms[name], w.size, k)
            rowwise = mode == "rows-all" or (mode == "rows-emb" and "embeddings" in name)
            if rowwise and w.ndim == 2:
                rn = np.linalg.norm(w.astype(np.float64), axis=1)
                scale = rn / np.sqrt((rn ** 2).mean())
                delta = (base * np.clip(scale, 1e-3, None)).astype(np.float32)[:, None]
            else:
                delta = base
            c = np.rint(w / delta).astype(np.int32)
            codes[name], weights[name], deltas[name] = c, (c.astype(np.float32) * delta).astype(np.float32), base
        return weights, deltas, codes


t0 = time.time()
s = RowSearch(originals, apply, outputs, 0.005)
k = s.run()
w, _, c = s.quantized(k)
apply(w)
got = outputs(evalf)
cos = float(riq.row_cosines(got, ref_eval).mean())
bits = sum(riq.entropy_bits(x) for x in c.values()) / sum(x.size for x in c.values())
print(f"{mode}: k={k:.0f} bits/weight {bits:.3f} ratio~{32/bits:.2f} calib {s._memo[k]:.5f} held-out {cos:.4f} {time.time()-t0:.0f}s")
