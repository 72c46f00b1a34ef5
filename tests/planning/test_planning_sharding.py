"""Per-GPU memory with N GPUs: DDP adds gradient buckets, FSDP2 divides the static terms.

The sharded weight bytes are also checked against a real FSDP2 sharding (tests/distributed:
``test_gloo.py::test_planner_shard_bytes_match_fsdp2``).
"""
import json

import pytest

from corept.cli import main
from corept.errors import InvalidOptionsError
from corept.planning import estimate, model_shape, plan
from corept.planning.gpus import GIB
from corept.planning.sharding import root_params

LLAMA8, LLAMA70 = "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B"


@pytest.fixture(scope="module")
def llama():
    return model_shape(LLAMA8)


def _est(shape, **kw):
    return estimate(shape, **dict(dict(method="lora", seq=2048, batch=2, r=16, gpu="h200"), **kw))


def test_one_gpu_is_the_single_gpu_estimate(llama):
    one, default = _est(llama, gpus=1, distributed="fsdp"), _est(llama)
    assert one.phases == default.phases and one.sharding.mode is None
    assert one.components["distributed_buffers"] == 0


@pytest.mark.parametrize("method", ["lora", "full"])
def test_ddp_keeps_the_replica_and_adds_gradient_buckets(llama, method):
    one, two = _est(llama, method=method), _est(llama, method=method, gpus=2)
    assert two.sharding.mode == "ddp"
    for phase in one.phases:
        assert two.phases[phase] - one.phases[phase] == two.components["distributed_buffers"]
    n_grad = 4 * llama.lora_params(16) if method == "lora" else 2 * llama.n_params
    assert two.components["distributed_buffers"] == n_grad


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_fsdp_divides_the_static_terms(llama, method):
    one, two = _est(llama, method=method), _est(llama, method=method, gpus=2, distributed="fsdp")
    c1, c2 = one.components, two.components
    side = 0
    if method == "qlora":  # NF4 block scales and code tables are not parameters: every GPU keeps them
        side = c1["weights"] - llama.n_quantized // 2 - 2 * llama.n_unquantized
        assert side > 0
    assert c2["weights"] == int((c1["weights"] - side) / 2 + side)
    for key in ("trainable_params", "optimizer_states"):
        assert c2[key] == int(c1[key] / 2), key
    root = 2 * root_params(llama)
    assert two.phases["optimizer step"] < one.phases["optimizer step"]
    if two.peak_phase == "optimizer step":  # full fine-tuning: every unit resharded by then
        assert method == "full" and c2["distributed_buffers"] == 0
    else:
        assert c2["distributed_buffers"] >= root  # the root unit stays gathered through forward and backward
    assert two.peak_allocated < one.peak_allocated


def test_more_gpus_less_memory_per_gpu_under_fsdp(llama):
    peaks = [_est(llama, method="full", gpus=n, distributed="fsdp").peak_allocated for n in (2, 4, 8)]
    assert peaks[0] > peaks[1] > peaks[2]


def test_70b_lora_needs_two_h200s_with_fsdp():
    shape = model_shape(LLAMA70)
    p1 = plan(shape, "lora", gpu="h200", max_seq_length=2048, batch_size=2, r=16)
    assert not p1.fits and "--gpus 2 --distributed fsdp (FSDP2 shards across 2 h200s)" in p1.suggestions
    p2 = plan(shape, "lora", gpu="h200", max_seq_length=2048, batch_size=2, r=16, gpus=2, distributed="fsdp")
    assert p2.fits and p2.estimate.peak_allocated < 0.6 * p1.estimate.peak_allocated
    assert p2.recommendation["grad_accum"] == 4 and p2.recommendation["effective_batch"] == 16


@pytest.mark.parametrize("kw, message", [({"gpus": 0}, "gpus must be a positive int"),
                                         ({"gpus": 2, "distributed": "zero3"}, "distributed must be one of")])
def test_bad_sharding_is_refused(llama, kw, message):
    with pytest.raises(InvalidOptionsError, match=message):
        _est(llama, **kw)


def test_cli_gpus_and_distributed(capsys):
    rc = main(["plan", "--model", LLAMA70, "--method", "lora", "--gpu", "h200", "--gpus", "2", "--distributed",
               "fsdp", "--max-seq-length", "2048", "--batch-size", "2", "--r", "16", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["estimate"]["gpus"] == 2 and d["estimate"]["distributed"] == "fsdp"
    assert d["estimate"]["components_gib"]["distributed_buffers"] > 0
    assert d["recommendation"]["gpus"] == 2
    assert main(["plan", "--model", LLAMA8, "--method", "lora", "--gpu", "h200", "--gpus", "2",
                 "--max-seq-length", "2048", "--batch-size", "2"]) == 0
    assert "2 GPUs, ddp (per-GPU figures)" in capsys.readouterr().out


def test_builtin_70b_config():
    shape = model_shape(LLAMA70)
    assert 70.5e9 < shape.n_params < 70.6e9 and shape.layers == 80
    assert 2 * shape.n_params / GIB > 130  # bf16 weights alone: more than one H200 can train with
