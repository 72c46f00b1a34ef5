"""The recommendation search, the smallest-change suggestions and the "nothing fits" errors."""
import math

import pytest

import corept
from corept.planning import DoesNotFitError, estimate, get_gpu, model_shape, plan, recommend
from corept.planning.recommend import SEQ_STEP, default_rank, largest_batch, longest_seq

LLAMA, QWEN32 = "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-32B"
CFG = dict(method="qlora", r=32, optim="adamw", checkpointing="corept")


@pytest.fixture(scope="module")
def llama():
    return model_shape(LLAMA)


@pytest.mark.parametrize("gpu", ["rtx3090", "l4", "t4", "a100-40"])
@pytest.mark.parametrize("batch", [1, 4])
def test_longest_seq_is_the_boundary(llama, gpu, batch):
    g = get_gpu(gpu)
    s = longest_seq(llama, g, 0.05, batch=batch, **CFG)
    if s == 0:
        assert not estimate(llama, seq=SEQ_STEP, batch=batch, gpu=g, **CFG).fits
        return
    assert s % SEQ_STEP == 0 and estimate(llama, seq=s, batch=batch, gpu=g, **CFG).fits
    assert s == llama.max_positions or not estimate(llama, seq=s + SEQ_STEP, batch=batch, gpu=g, **CFG).fits


def test_largest_batch_is_a_fitting_power_of_two(llama):
    g = get_gpu("rtx3090")
    b = largest_batch(llama, g, 0.05, seq=4096, limit=64, **CFG)
    assert b >= 1 and b & (b - 1) == 0 and estimate(llama, seq=4096, batch=b, gpu=g, **CFG).fits
    assert b == 64 or not estimate(llama, seq=4096, batch=2 * b, gpu=g, **CFG).fits


def test_recommend_contract_for_profile_auto():
    rec = recommend(LLAMA, "qlora", "rtx3090")
    assert {"max_seq_length", "batch_size", "grad_accum", "r", "optim"} <= set(rec)
    assert rec["r"] == default_rank(model_shape(LLAMA)) == 32
    assert rec["grad_accum"] == math.ceil(16 / rec["batch_size"]) and rec["effective_batch"] >= 16
    assert rec["max_seq_length"] == min(2048, rec["longest_seq_at_batch_1"])
    assert rec["required_gib"] <= rec["budget_gib"]
    pinned = recommend(LLAMA, "qlora", "rtx3090", max_seq_length=8192, r=16, target_batch=32, optim="adamw_8bit")
    assert (pinned["max_seq_length"], pinned["r"], pinned["optim"]) == (8192, 16, "adamw_8bit")
    assert pinned["grad_accum"] * pinned["batch_size"] >= 32
    by_batch = recommend(LLAMA, "qlora", "rtx3090", batch_size=2)
    assert by_batch["batch_size"] == 2 and by_batch["max_seq_length"] % SEQ_STEP == 0


def test_seq_grows_with_vram_and_shrinks_with_rank(llama):
    p = lambda gpu, r: plan(llama, "qlora", gpu=gpu, r=r, batch_size=1).longest_seq_at_batch_1  # noqa: E731
    assert p("t4", 32) < p("rtx3090", 32) < p("a100-40", 32)
    assert p("rtx3090", 64) <= p("rtx3090", 16)


def test_nothing_fits_names_the_smallest_change():
    with pytest.raises(DoesNotFitError) as info:
        recommend(QWEN32, "lora", "rtx3090")
    msg = str(info.value)
    assert "does not fit on rtx3090" in msg and "even at seq 256" in msg
    assert "Smallest change that would fit: use --load-in-4bit / --method qlora" in msg
    assert info.value.suggestions[0].startswith("use --load-in-4bit")
    assert any("--gpu" in s for s in info.value.suggestions)
    with pytest.raises(DoesNotFitError, match=r"a GPU with >= \d+ GiB"):
        recommend(QWEN32, "qlora", "t4")


def test_explicit_config_that_does_not_fit_suggests_a_shorter_seq(llama):
    p = plan(llama, "qlora", gpu="rtx3090", max_seq_length=262144, batch_size=1, r=32)
    assert not p.fits and p.recommendation is None
    first = p.suggestions[0]
    assert first.startswith("seq <= ")
    seq = int(first.split()[2])
    assert estimate(llama, seq=seq, batch=1, gpu="rtx3090", **CFG).fits
    p2 = plan(llama, "qlora", gpu="rtx3090", max_seq_length=16384, batch_size=64, r=32)
    assert not p2.fits and p2.suggestions[0].startswith("--batch-size ")
    with pytest.raises(DoesNotFitError, match="at seq 262144 even with batch 1"):
        recommend(llama, "qlora", "rtx3090", max_seq_length=262144, r=32)


def test_explicit_config_that_fits_has_a_recommendation(llama):
    p = plan(llama, "qlora", gpu="rtx3090", max_seq_length=1024, batch_size=2, r=32)
    assert p.fits and not p.suggestions and p.recommendation["grad_accum"] == 8


def test_rank_is_halved_only_when_needed():
    shape = model_shape(QWEN32)
    need = {r: estimate(shape, method="qlora", seq=SEQ_STEP, r=r, gpu="h200").required for r in (8, 16)}
    between = get_gpu(vram_gib=(need[8] + need[16]) / 2 / 0.95 / 2**30)  # r 16 does not fit, r 8 does
    p = plan(shape, "qlora", gpu=between)
    assert default_rank(shape) == 16 and p.estimate.r == 8 and p.fits
    with pytest.raises(DoesNotFitError):  # a pinned rank is never changed
        plan(shape, "qlora", gpu=between, r=16)


def test_corept_plan_wrapper(llama):
    p = corept.plan(LLAMA, "qlora", gpu="rtx3090")
    assert p.fits and p.recommendation["r"] == 32
    assert p.to_dict()["estimate"]["model"]["name"] == LLAMA


def test_invalid_pinned_values_are_rejected():
    from corept.errors import InvalidOptionsError

    with pytest.raises(InvalidOptionsError, match="r must be a positive int"):
        plan(LLAMA, "qlora", gpu="rtx3090", r=0)
    with pytest.raises(InvalidOptionsError, match="max_seq_length must be a positive int"):
        plan(LLAMA, "qlora", gpu="rtx3090", max_seq_length=-5)
    with pytest.raises(InvalidOptionsError, match="method must be one of lora, qlora, full"):
        recommend(LLAMA, "dora", "rtx3090")
