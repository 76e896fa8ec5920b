"""Real-token indices built on the host select exactly what a boolean mask selects; CPU copies unchanged."""

from __future__ import annotations

import numpy as np
import torch

from qcache.extract.run.transfer import Fetch, real_token_index, side_stream, to_device


def test_real_token_index_equals_the_mask_select():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 9, size=rng.integers(1, 6))
        seq = int(lengths.max())
        mask = np.arange(seq)[None, :] < lengths[:, None]  # (batch, seq) right padding
        t = torch.from_numpy(rng.standard_normal((len(lengths), seq, 3)).astype(np.float32))
        idx = torch.from_numpy(real_token_index(lengths, seq))
        got = t.reshape(-1, 3).index_select(0, idx)
        assert torch.equal(got, t[torch.from_numpy(mask)])


def test_cpu_transfers_are_plain_copies():
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    t = to_device(a, torch.device("cpu"))
    assert t.data_ptr() == torch.from_numpy(a).data_ptr()  # a view, as before
    assert side_stream(torch.device("cpu")) is None
    x = torch.randn(4, 5, dtype=torch.float16)
    out = Fetch({"x": x}, None).result()
    assert out["x"].dtype == np.float16 and np.array_equal(out["x"], x.numpy())
