"""Secure aggregation (Bonawitz et al. 2017 + SecAgg+ neighbourhoods, Bell et al. 2020)."""

import numpy as np
import pytest
import torch

from fedfm.privacy.secagg import (
    Quantizer,
    SecAggAbort,
    SecAggClient,
    SecAggServer,
    ShareAuthenticationError,
    neighbour_graph,
    secure_sum,
)
from fedfm.privacy.secagg_crypto import shamir_combine, shamir_split

N, DIM, T = 12, 50, 8  # complete graph: (12)/2 < 8 <= 12


def _vectors(n=N, dim=DIM, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1.0, 1.0, dim) for _ in range(n)]


def _assert_close_sum(total, vectors, survivors, quantizer):
    true = np.sum([vectors[u] for u in survivors], axis=0)
    bound = quantizer.error_bound(len(survivors))
    err = np.abs(np.asarray(total) - true).max()
    assert err <= bound * (1 + 1e-9) + 1e-12, (err, bound)


@pytest.mark.parametrize("n_drop", [0, 1, 4])  # 0 %, ~10 %, 33 % of 12 clients
def test_sum_with_dropouts(n_drop):
    xs = _vectors()
    drop = set(np.random.default_rng(n_drop).choice(N, n_drop, replace=False).tolist())
    total, survivors = secure_sum(xs, T, drop_after_share=drop, seed=n_drop)
    assert survivors == sorted(set(range(N)) - drop)
    _assert_close_sum(total, xs, survivors, Quantizer.for_clients(N))
    # a wrong answer is far outside the bound: dropping the drop-outs' masks matters
    if drop:
        assert np.abs(total - np.sum(xs, axis=0)).max() > 1e-3


def test_exactly_threshold_survivors_works_and_one_fewer_aborts():
    xs = _vectors()
    total, survivors = secure_sum(xs, T, drop_after_share={0, 1, 2, 3}, seed=1)  # 8 == t survivors
    assert len(survivors) == T
    _assert_close_sum(total, xs, survivors, Quantizer.for_clients(N))
    with pytest.raises(SecAggAbort, match="threshold"):
        secure_sum(xs, T, drop_after_share={0, 1, 2, 3, 4}, seed=1)  # 7 < t


def test_dropout_during_unmasking_still_sums_all_masked_inputs():
    xs = _vectors()
    total, survivors = secure_sum(xs, T, drop_after_share={7}, drop_before_unmask={2, 9}, seed=2)
    assert survivors == [u for u in range(N) if u != 7]  # 2 and 9 sent their inputs
    _assert_close_sum(total, xs, survivors, Quantizer.for_clients(N))
    with pytest.raises(SecAggAbort, match="threshold"):
        secure_sum(xs, T, drop_after_share={7}, drop_before_unmask={0, 1, 2, 3}, seed=2)


@pytest.mark.parametrize("drop", [set(), {3, 8}])
def test_secagg_plus_sparse_graph_sums(drop):
    k, t = 4, 3
    graph = neighbour_graph(range(N), k, b"round-seed")
    assert all(len(nb) == k for nb in graph.values())
    assert all(u in graph[v] for u, nb in graph.items() for v in nb)  # symmetric
    transcript = []
    xs = _vectors(seed=5)
    total, survivors = secure_sum(xs, t, neighbours=k, drop_after_share=drop, seed=b"round-seed", transcript=transcript)
    _assert_close_sum(total, xs, survivors, Quantizer.for_clients(N))
    # shares (and hence masks) only travel inside the k-neighbourhood
    for m in transcript:
        if m["type"] == "share_keys":
            assert set(m["shares"]) == graph[m["id"]] | {m["id"]}
    assert neighbour_graph(range(N), N - 1, b"x") == neighbour_graph(range(N), None, b"x")


def test_threshold_must_exceed_half_the_neighbourhood():
    with pytest.raises(ValueError, match="threshold"):
        SecAggServer(range(N), 6, DIM)  # 2 * 6 <= 12: a server could get both b_u and s_u
    with pytest.raises(ValueError, match="threshold"):
        SecAggServer(range(N), 6, DIM, degree=4)  # t > k + 1


def _run_until_shares(n=5, t=3, dim=8):
    server = SecAggServer(range(n), t, dim, round_seed=b"s")
    clients = {u: SecAggClient(u, server.setup_message()) for u in range(n)}
    out = server.on_keys([c.advertise_keys() for c in clients.values()])
    out = server.on_shares([clients[u].share_keys(m) for u, m in out.items()])
    return server, clients, out


def test_tampered_share_is_detected():
    _, clients, out = _run_until_shares()
    ct = bytearray(out[2]["shares"][0])
    ct[20] ^= 1
    out[2]["shares"][0] = bytes(ct)
    with pytest.raises(ShareAuthenticationError, match="client 2: share from client 0.*authentication"):
        clients[2].masked_input(out[2], np.zeros(8))
    # untouched recipients are fine
    clients[3].masked_input(out[3], np.zeros(8))


def test_misrouted_share_is_detected():
    _, clients, out = _run_until_shares()
    out[2]["shares"][0] = out[3]["shares"][0]  # the share 0 encrypted for client 3
    with pytest.raises(ShareAuthenticationError):
        clients[2].masked_input(out[2], np.zeros(8))


def test_never_reveals_both_self_mask_and_mask_key_of_a_client():
    transcript = []
    secure_sum(_vectors(), T, drop_after_share={1, 6, 10}, seed=3, transcript=transcript)
    revealed_b, revealed_s = set(), set()
    for m in transcript:
        if m["type"] == "unmask":
            revealed_b |= set(m["b_shares"])
            revealed_s |= set(m["s_shares"])
    assert revealed_s == {1, 6, 10}
    assert revealed_b == set(range(N)) - {1, 6, 10}
    assert not revealed_b & revealed_s


def test_client_refuses_to_unmask_twice_or_when_not_a_survivor():
    server, clients, out = _run_until_shares()
    masked = {u: clients[u].masked_input(m, np.zeros(8)) for u, m in out.items()}
    out = server.on_masked(masked.values())
    clients[0].unmask(out[0])
    with pytest.raises(SecAggAbort):
        clients[0].unmask(out[0])
    with pytest.raises(SecAggAbort, match="survivor"):
        clients[1].unmask({"survivors": [0, 2, 3, 4]})


def test_shamir_threshold_exact():
    secret = bytes(range(32))
    shares = shamir_split(secret, 4, range(1, 8))
    for pick in ([1, 2, 3, 4], [7, 5, 3, 1], [2, 4, 6, 7]):
        assert shamir_combine({x: shares[x] for x in pick}, 4) == secret
    assert shamir_combine(shares, 4) == secret  # extra shares are cross-checked
    with pytest.raises(SecAggAbort, match="threshold"):
        shamir_combine({x: shares[x] for x in (1, 2, 3)}, 4)
    # t-1 shares interpolated as if the threshold were t-1 give garbage, not the secret
    try:
        assert shamir_combine({x: shares[x] for x in (1, 2, 3)}, 3) != secret
    except SecAggAbort:
        pass
    bad = dict(shares)
    bad[7] = bad[7][:-1] + bytes([bad[7][-1] ^ 1])
    with pytest.raises(SecAggAbort, match="inconsistent"):
        shamir_combine(bad, 4)


def _uniformity_stats(y: np.ndarray, x: np.ndarray):
    u = y.astype(np.float64) / 2.0**32
    counts = np.bincount((y >> np.uint32(26)).astype(np.int64), minlength=64)  # 64 bins
    expected = y.size / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    corr = float(np.corrcoef(u, x)[0, 1])
    return chi2, u.mean(), u.var(), corr


def test_masked_input_looks_uniform_and_independent_of_input():
    dim = 20_000
    rng = np.random.default_rng(11)
    inputs = {
        "constant -R": np.full(dim, -1.0),
        "ramp": np.linspace(-1.0, 1.0, dim),
        "random": rng.uniform(-1.0, 1.0, dim),
    }
    chi2_limit = 63 + 6 * np.sqrt(2 * 63)  # 63 dof, ~6 sigma
    z = 6 * np.sqrt(1 / 12 / dim)
    for name, x in inputs.items():
        xs = [x] + [rng.uniform(-1, 1, dim) for _ in range(3)]
        transcript = []
        secure_sum(xs, 3, seed=name, transcript=transcript)
        (msg,) = [m for m in transcript if m["type"] == "masked_input" and m["id"] == 0]
        y = np.frombuffer(msg["y"], dtype="<u4")
        chi2, mean, var, corr = _uniformity_stats(y, x if x.std() > 0 else np.arange(dim, dtype=float))
        assert chi2 < chi2_limit, (name, chi2)
        assert abs(mean - 0.5) < z, (name, mean)
        assert abs(var - 1 / 12) < 0.05 / 12, (name, var)
        assert abs(corr) < 6 / np.sqrt(dim), (name, corr)
    # the same statistics do flag an unmasked encoding: the test has power
    x = inputs["ramp"]
    chi2, _, _, corr = _uniformity_stats(Quantizer.for_clients(4).quantize(x), x)
    assert chi2 > chi2_limit or abs(corr) > 0.5


def test_quantizer_capacity_and_error_bound():
    q = Quantizer.for_clients(12, clip=0.5)
    assert q.bits == 28 and q.max_clients >= 12
    assert 12 * q.levels <= 2**32 - 1 and 12 * (2 ** (q.bits + 1) - 1) > 2**32 - 1  # finest that fits
    assert Quantizer.for_clients(65537).bits == 16
    x = np.array([-0.5, -0.1234567, 0.0, 0.3333333, 0.5, 7.0, -7.0])
    enc = q.quantize(x)
    assert enc.dtype == np.uint32 and enc.max() <= q.levels
    dec = q.dequantize_sum(enc, 1)
    inside = np.abs(x) <= 0.5
    assert np.abs(dec[inside] - x[inside]).max() <= q.error_bound(1)
    assert dec[-2] == pytest.approx(0.5) and dec[-1] == pytest.approx(-0.5)  # clipped
    with pytest.raises(ValueError):
        q.quantize(np.array([np.nan]))
    with pytest.raises(ValueError, match="overflow"):
        SecAggServer(range(20), 15, 4, quantizer=Quantizer(bits=29))  # 20 * (2^29 - 1) >= 2^32


def test_torch_tensors_in_and_out():
    xs = [torch.randn(5, 10, generator=torch.Generator().manual_seed(i)).clamp(-1, 1) for i in range(6)]
    total, survivors = secure_sum(xs, 4, seed=0)
    assert isinstance(total, torch.Tensor) and total.shape == (5, 10) and total.dtype == torch.float32
    assert torch.allclose(total, torch.stack(xs).sum(0), atol=1e-5)
    assert survivors == list(range(6))
