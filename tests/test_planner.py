"""The planner over a grid of allocations, property tests, and the seed workload's case."""

from __future__ import annotations

import dataclasses
import heapq
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcbatch.errors import ConfigError, PlanInfeasibleError
from hpcbatch.planner import (
    Footprint,
    PlanSettings,
    chunk_capacity,
    gpu_batch_size,
    make_plan,
    min_memory_bytes,
    slurm_mem,
)
from hpcbatch.predictive.footprint import technical_footprint
from hpcbatch.resources import GPU, Resources, Worker
from hpcbatch.stocks.footprint import stocks_footprint

GB = 10**9
GiB = 1024**3
MiB = 1024**2


def alloc(mem_bytes: int, cpus: int, gpus: tuple[GPU, ...] = ()) -> Resources:
    return Resources(
        memory_bytes=int(mem_bytes),
        memory_source="test",
        cpus=cpus,
        cpus_source="test",
        gpus=gpus,
        planned_ahead=True,
    )


def busiest(n_items: int, chunk: int, slots: int) -> int:
    """Items on the busiest slot when chunks, in order, go to whichever slot is free first
    (every item taking the same time): simulated, not the planner's formula."""
    loads = [0] * slots
    for start in range(0, n_items, chunk):
        heapq.heapreplace(loads, loads[0] + min(chunk, n_items - start))
    return max(loads)


def check_plan(plan, footprint: Footprint, res: Resources, st_: PlanSettings) -> None:
    """Every invariant a user relies on."""
    assert plan.predicted_peak_bytes <= plan.memory_fraction * plan.memory_limit_bytes
    assert plan.predicted_peak_bytes == (
        footprint.fixed_bytes + plan.threads_per_worker * plan.chunk_size * footprint.per_item_bytes
    )
    node = plan.n_workers * plan.memory_limit_bytes + footprint.node_shared_bytes
    assert node == plan.predicted_node_bytes
    assert plan.reserve_bytes == max(st_.reserve_bytes, footprint.driver_bytes)
    assert node + plan.reserve_bytes <= res.memory_bytes
    assert 1 <= plan.n_workers * plan.threads_per_worker <= max(res.cpus, 1)
    assert min(st_.min_chunk, footprint.n_items) <= plan.chunk_size <= footprint.n_items
    assert plan.n_chunks == math.ceil(footprint.n_items / plan.chunk_size)
    assert f"binding constraint: {plan.binding}" in plan.reasons
    # The binding constraint really binds.
    if plan.binding == "cpus":
        assert plan.n_workers == res.cpus // plan.threads_per_worker
    elif plan.binding == "n_workers set":
        assert plan.n_workers == st_.n_workers
    elif plan.binding == "items":
        per_chunk = min(st_.chunk_size or st_.min_chunk, footprint.n_items)
        assert plan.n_workers == math.ceil(footprint.n_items / per_chunk) < res.cpus
    elif plan.binding == "memory (chunk size)":
        # the largest chunk that fits, or that chunk evened out over the workers' slots
        threads = plan.threads_per_worker
        room = plan.memory_fraction * plan.memory_limit_bytes - footprint.fixed_bytes
        largest = int(room // (threads * footprint.per_item_bytes))
        bigger = footprint.fixed_bytes + threads * (largest + 1) * footprint.per_item_bytes
        assert bigger > plan.memory_fraction * plan.memory_limit_bytes
        slots = plan.n_workers * threads
        assert plan.chunk_size <= largest
        assert busiest(footprint.n_items, plan.chunk_size, slots) <= busiest(
            footprint.n_items, largest, slots
        )
    elif plan.binding.startswith("memory"):
        assert plan.n_workers < res.cpus
        assert any(r.startswith(f"workers: {plan.n_workers}, not ") for r in plan.reasons)
        with pytest.raises(PlanInfeasibleError):  # one more worker would not fit
            more = _with(
                st_, n_workers=plan.n_workers + 1, threads_per_worker=plan.threads_per_worker
            )
            make_plan(footprint, res, more)
    else:  # pragma: no cover - a new binding name needs a check here
        raise AssertionError(plan.binding)


def check_infeasible(exc: PlanInfeasibleError, footprint, res, st_) -> None:
    need = exc.min_memory_bytes
    assert need is not None and need > res.memory_bytes
    message = str(exc)
    assert "needs at least" in message and "request --mem=" in message
    assert "\n" not in message
    requested_gib = int(message.split("request --mem=")[1].split("G")[0])
    assert requested_gib * GiB >= need
    shown_gb = float(message.split("needs at least ")[1].split(" GB")[0])
    assert shown_gb * GB >= need  # "at least" never understates
    # The minimum is sufficient: planning with exactly that much memory succeeds.
    plan = make_plan(footprint, alloc(need, res.cpus, res.gpus), st_)
    check_plan(plan, footprint, alloc(need, res.cpus, res.gpus), st_)


def _with(st_: PlanSettings, **kw) -> PlanSettings:
    from dataclasses import replace

    return replace(st_, **kw)


# ------------------------------------------------------------------- grid ----

FOOTPRINTS = {
    "stocks-5000x400": stocks_footprint(5000, 400, 10),
    "stocks-5000x180": stocks_footprint(5000, 180, 10),
    "stocks-50x90": stocks_footprint(50, 90, 5),
    "predictive-seed-copied": technical_footprint(21761, 31467, 2, 1000, shared_input_mmap=False),
    "predictive-seed-mmap": technical_footprint(21761, 31467, 2, 1000),
    "predictive-seed-obs-copied": technical_footprint(
        21761, 31467, 2, 1000, with_observations=True, shared_input_mmap=False
    ),
    "predictive-small-obs": technical_footprint(2000, 3000, 3, 200, with_observations=True),
}
ALLOCATIONS_GB = [2, 12, 19, 64, 500]
CPUS = [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("name", sorted(FOOTPRINTS))
def test_grid_of_allocations(name):
    footprint = FOOTPRINTS[name]
    st_ = PlanSettings()
    outcomes = {"planned": 0, "infeasible": 0}
    for mem_gb in ALLOCATIONS_GB:
        for cpus in CPUS:
            res = alloc(mem_gb * GB, cpus)
            try:
                plan = make_plan(footprint, res, st_)
            except PlanInfeasibleError as exc:
                check_infeasible(exc, footprint, res, st_)
                outcomes["infeasible"] += 1
            else:
                check_plan(plan, footprint, res, st_)
                outcomes["planned"] += 1
    # Every footprint plans on the 500 GB node; none of these fits nothing at all.
    assert outcomes["planned"] >= len(CPUS)


def test_grid_more_memory_never_means_fewer_workers():
    footprint = FOOTPRINTS["predictive-seed-copied"]
    previous = 0
    for mem_gb in ALLOCATIONS_GB:
        try:
            n = make_plan(footprint, alloc(mem_gb * GB, 32)).n_workers
        except PlanInfeasibleError:
            n = 0
        assert n >= previous
        previous = n


def test_stocks_on_2gb_is_infeasible_and_says_what_to_request():
    footprint = stocks_footprint(5000, 400, 10)
    with pytest.raises(PlanInfeasibleError) as info:
        make_plan(footprint, alloc(1 * GB, 4))
    assert "--lookback-days 200" in str(info.value)
    check_infeasible(info.value, footprint, alloc(1 * GB, 4), PlanSettings())


def test_fixed_batch_size_and_fixed_workers_min_memory():
    footprint = stocks_footprint(5000, 400, 10)
    st_ = PlanSettings(chunk_size=100, n_workers=8)
    res = alloc(2 * GB, 8)
    with pytest.raises(PlanInfeasibleError) as info:
        make_plan(footprint, res, st_)
    assert "for 8 workers" in str(info.value)
    assert "lower the chunk size below 100" in str(info.value)
    check_infeasible(info.value, footprint, res, st_)
    plan = make_plan(footprint, alloc(info.value.min_memory_bytes, 8), st_)
    assert (plan.n_workers, plan.chunk_size) == (8, 100)


def test_reasons_explain_chunk_and_workers():
    plan = make_plan(stocks_footprint(5000, 400, 10), alloc(12 * GB, 8))
    text = "\n".join(plan.reasons)
    assert "workers: " in text and "chunk: " in text and "predicted peak per worker" in text
    # the stocks constants say where they came from (issue 15 item 6), not "uncalibrated"
    source = plan.to_dict()["footprint_source"]
    assert source.startswith("analytic, constants measured ") and "--calibrate" in source
    assert f"footprint {source}" in text


def test_few_items_cap_workers():
    plan = make_plan(stocks_footprint(3, 90, 5), alloc(64 * GB, 16))
    assert plan.n_workers == 3 and plan.binding == "items"
    assert any("only 3 stocks to share out" in r for r in plan.reasons)


def test_chunk_shrinks_before_workers_drop():
    # 4 CPUs, copies small, items big: all 4 workers stay, the chunk is what shrinks.
    footprint = Footprint("w", "item", 1000, per_item_bytes=100 * MiB, baseline_bytes=100 * MiB)
    plan = make_plan(footprint, alloc(4 * GB, 4))
    assert plan.n_workers == 4
    assert plan.binding == "memory (chunk size)"
    assert plan.chunk_size < math.ceil(1000 / (4 * 4))


@pytest.mark.parametrize(
    ("n_items", "chunks", "chunk", "was"),
    [(20, 10, 2, "not 7 of 3"), (100, 10, 10, "not 8 of 13"), (40, 8, 5, None)],
)
def test_the_chunk_is_evened_out_so_no_worker_waits_on_a_tail(n_items, chunks, chunk, was):
    """20 samples on 2 workers at ~4 chunks per worker: 7 chunks of 3 leave one worker 11
    samples and the other 9; 10 chunks of 2 give each 10.  40 already shares out evenly."""
    fp = Footprint("w", "sample", n_items, per_item_bytes=MiB, baseline_bytes=100 * MiB)
    plan = make_plan(fp, alloc(16 * GB, 2))
    assert (plan.n_workers, plan.n_chunks, plan.chunk_size) == (2, chunks, chunk)
    assert busiest(n_items, chunk, 2) == n_items // 2
    text = "\n".join(plan.reasons)
    if was:
        assert f"{chunks} chunks of {chunk}, {was}, share out evenly" in text, text
        assert f"at most {n_items // 2} samples per worker" in text, text
    else:
        assert "share out evenly" not in text


def test_a_memory_bound_chunk_is_evened_out_below_what_fits() -> None:
    """5,000 items where 400 fit: 13 chunks (the last of 200) would leave one worker
    2,600 items against 2,400; 14 chunks of 358 give at most 2,506."""
    fp = Footprint("w", "item", 5000, per_item_bytes=MiB, baseline_bytes=100 * MiB)
    st_ = PlanSettings(n_workers=2, chunk_size=None)
    res = alloc((2 * (100 + 400) / 0.6 + 256 + 1) * MiB, 2)  # 400 items fit, not 401
    plan = make_plan(fp, res, st_)
    check_plan(plan, fp, res, st_)
    assert plan.binding == "memory (chunk size)"
    assert (plan.n_chunks, plan.chunk_size) == (14, 358)
    assert busiest(5000, plan.chunk_size, 2) == 2506 < busiest(5000, 400, 2) == 2600
    assert any(r.startswith("chunk: 358 items at 1.00 MiB each (memory: the most items whose "
                            "working set fits under the target; 14 chunks of 358, not 13 of 400")
               for r in plan.reasons), plan.reasons  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 6), st.integers(1, 8))
def test_property_evening_never_lengthens_the_busiest_worker(n_items, cpus, per_worker):
    fp = Footprint("w", "item", n_items, per_item_bytes=1, baseline_bytes=MiB)
    plan = make_plan(fp, alloc(64 * GB, cpus), PlanSettings(chunks_per_worker=per_worker))
    slots = plan.n_workers * plan.threads_per_worker
    balance = math.ceil(n_items / (plan.n_workers * per_worker))
    assert plan.chunk_size <= balance
    assert busiest(n_items, plan.chunk_size, slots) <= busiest(n_items, balance, slots)
    # at most one more round of chunks over the workers than the balance chunk gives
    assert plan.n_chunks <= (math.ceil(math.ceil(n_items / balance) / slots) + 1) * slots


# ----------------------------------------------------------- the seed case ----

SEED = dict(cells=21761, features=31467, groups=2, samples=1000)


def test_seed_case_input_is_2_55_gib():
    fp = technical_footprint(**SEED)
    assert fp.shared_input_bytes == 21761 * 31467 * 4
    assert round(fp.shared_input_bytes / GiB, 2) == 2.55


def test_seed_case_copies_binding_does_not_plan_32_workers():
    copied = technical_footprint(**SEED, shared_input_mmap=False)
    res = alloc(100 * GB, 32)
    plan = make_plan(copied, res)
    check_plan(plan, copied, res, PlanSettings())
    assert plan.n_workers < 32
    assert plan.binding == "memory (per-worker copies)"
    assert any("2.55 GiB is copied into every worker" in r for r in plan.reasons)
    assert any("CPUs stay idle" in r and "memory-map" in r for r in plan.reasons)
    # Each worker's limit holds its own copy of the input.
    assert plan.memory_limit_bytes * plan.memory_fraction >= copied.shared_input_bytes


def test_seed_case_mmap_counts_the_input_once_per_node():
    mmap = technical_footprint(**SEED)
    copied = technical_footprint(**SEED, shared_input_mmap=False)
    res = alloc(100 * GB, 32)
    plan = make_plan(mmap, res)
    check_plan(plan, mmap, res, PlanSettings())
    assert plan.n_workers == 32 and plan.binding == "cpus"
    assert mmap.node_shared_bytes == mmap.shared_input_bytes
    assert mmap.fixed_bytes == copied.fixed_bytes - copied.shared_input_bytes
    # One page-cache copy per node: the workers' limits plus one input fit the allocation.
    assert plan.n_workers * plan.memory_limit_bytes + mmap.shared_input_bytes <= res.memory_bytes
    assert any("memory-mapped: one page-cache copy per node" in r for r in plan.reasons)


def test_seed_case_threads_use_the_cpus_copies_leave_idle():
    copied = technical_footprint(**SEED, shared_input_mmap=False)
    res = alloc(100 * GB, 32)
    single = make_plan(copied, res)
    st_ = PlanSettings(max_threads_per_worker=4)
    plan = make_plan(copied, res, st_)
    check_plan(plan, copied, res, st_)
    assert plan.threads_per_worker > 1
    assert plan.n_workers * plan.threads_per_worker > single.n_workers  # more CPUs busy
    assert plan.n_workers * plan.threads_per_worker <= 32
    assert plan.n_workers <= single.n_workers  # never more copies than fit before
    assert any(r.startswith("threads: ") for r in plan.reasons)
    # Nothing to gain where the CPUs are busy already: one thread per worker stays.
    mmap = technical_footprint(**SEED)
    assert make_plan(mmap, res, st_).threads_per_worker == 1


def test_seed_case_500gb_32cpus():
    res = alloc(500 * GB, 32)
    # Without the likelihood the latent sites are small: 32 workers fit even with copies.
    plan = make_plan(technical_footprint(**SEED, shared_input_mmap=False), res)
    assert plan.n_workers == 32
    # With observations over all cells at once (the seed's OOM): 4 x N x T x 4 bytes per
    # sample; copies on top.
    everything = dict(with_observations=True, cell_block=SEED["cells"])
    obs_copied = technical_footprint(**SEED, **everything, shared_input_mmap=False)
    obs_mmap = technical_footprint(**SEED, **everything)
    p_copied, p_mmap = make_plan(obs_copied, res), make_plan(obs_mmap, res)
    for p, fp in ((p_copied, obs_copied), (p_mmap, obs_mmap)):
        check_plan(p, fp, res, PlanSettings())
        assert p.n_workers < 32 and p.chunk_size == 1
    assert p_copied.n_workers < p_mmap.n_workers


# ------------------------------------------------------------------- GPU ----


def test_gpu_batch_from_free_memory():
    assert gpu_batch_size(10 * GiB, 1 * GiB, 100 * MiB, 0.8) == int((8 * GiB - GiB) // (100 * MiB))
    assert gpu_batch_size(GiB, 2 * GiB, MiB, 0.8) == 0
    footprint = stocks_footprint(5000, 400, 10)
    gpus = (GPU(0, "planned", 16 * GiB, 16 * GiB, "test"),)
    plan = make_plan(footprint, alloc(64 * GB, 4, gpus), PlanSettings(use_gpu=True))
    share = 16 * GiB // plan.n_workers
    expected = gpu_batch_size(share, footprint.gpu_fixed_bytes, footprint.gpu_per_item_bytes, 0.8)
    assert plan.gpu_batch_size == expected > 0
    no_gpu = make_plan(footprint, alloc(64 * GB, 4), PlanSettings(use_gpu=True))
    assert no_gpu.gpu_batch_size is None
    assert any("GPU asked for but none found" in r for r in no_gpu.reasons)
    tiny = (GPU(0, "planned", 10 * MiB, 10 * MiB, "test"),)
    with pytest.raises(PlanInfeasibleError, match="GPU"):
        make_plan(footprint, alloc(64 * GB, 1, tiny), PlanSettings(use_gpu=True))


# -------------------------------------------------------------- settings ----


@pytest.mark.parametrize(
    "kw",
    [
        {"memory_fraction": 0},
        {"memory_fraction": 1.0},
        {"memory_fraction": -0.5},
        {"memory_fraction": 0.96},  # above Dask's terminate threshold
        {"min_chunk": 0},
        {"chunk_size": 0},
        {"max_chunk": 1, "min_chunk": 2},
        {"chunk_size": 1, "min_chunk": 2},
        {"thresholds": {"target": 0.6}},
    ],
)
def test_bad_settings_raise_config_error(kw):
    with pytest.raises(ConfigError):
        PlanSettings(**kw)


def test_footprint_rejects_zero_items_and_negative_bytes():
    with pytest.raises(ConfigError, match="must be positive"):
        Footprint("w", "item", 0, per_item_bytes=1, baseline_bytes=1)
    with pytest.raises(ConfigError, match="must not be negative"):
        Footprint("w", "item", 1, per_item_bytes=-1, baseline_bytes=1)


# ------------------------------------------------------------ properties ----

footprints = st.builds(
    lambda n, per, base, shared, smmap, model, mmmap: Footprint(
        "w",
        "item",
        n,
        per_item_bytes=per,
        baseline_bytes=base,
        shared_input_bytes=shared,
        shared_input_mmap=smmap,
        model_bytes=model,
        model_mmap=mmmap,
    ),
    st.integers(1, 100_000),
    st.integers(0, 20 * GiB),
    st.integers(0, 4 * GiB),
    st.integers(0, 50 * GiB),
    st.booleans(),
    st.integers(0, 2 * GiB),
    st.booleans(),
)
plan_settings = st.builds(
    lambda fraction, min_chunk, threads, chunk, max_threads: PlanSettings(
        memory_fraction=fraction,
        min_chunk=min_chunk,
        threads_per_worker=threads,
        max_threads_per_worker=max_threads,
        chunk_size=None if chunk is None else max(chunk, min_chunk),
    ),
    st.floats(0.05, 0.9),
    st.integers(1, 8),
    st.integers(1, 4),
    st.one_of(st.none(), st.integers(1, 500)),
    st.integers(1, 8),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(footprints, st.integers(10**8, 2 * 10**12), st.integers(1, 128), plan_settings)
def test_property_plan_or_sufficient_minimum(footprint, memory, cpus, st_):
    res = alloc(memory, cpus)
    try:
        plan = make_plan(footprint, res, st_)
    except PlanInfeasibleError as exc:
        need = exc.min_memory_bytes
        assert need > memory
        plan = make_plan(footprint, alloc(need, cpus), st_)
        check_plan(plan, footprint, alloc(need, cpus), st_)
        return
    check_plan(plan, footprint, res, st_)
    # The minimum for this footprint never exceeds an allocation that plans.
    st_ = _with(st_, threads_per_worker=plan.threads_per_worker)
    assert min_memory_bytes(footprint, st_) <= memory


@settings(max_examples=100, deadline=None)
@given(st.integers(-10, 10**12), st.integers(0, 10**9), st.integers(1, 16))
def test_property_chunk_capacity_fits(budget, per_item, threads):
    n = chunk_capacity(budget, per_item, threads)
    assert n >= 0
    if per_item and n:
        assert n * per_item * threads <= budget < (n + 1) * per_item * threads


def test_the_allocation_keeps_the_workload_driver_when_it_is_above_the_reserve() -> None:
    """A torch/Pyro driver (client + scheduler) is ~350 MiB: the workers must not be given
    memory the driver already uses, or the node total runs over before Dask reacts."""
    res = alloc(8 * GiB, 2)
    plain = Footprint("w", "item", 1000, per_item_bytes=MiB, baseline_bytes=200 * MiB)
    heavy = dataclasses.replace(plain, driver_bytes=400 * MiB)
    p_plain, p_heavy = make_plan(plain, res), make_plan(heavy, res)
    assert p_plain.reserve_bytes == PlanSettings().reserve_bytes == 256 * MiB
    assert p_heavy.reserve_bytes == 400 * MiB
    assert p_heavy.n_workers * p_heavy.memory_limit_bytes + 400 * MiB <= res.memory_bytes
    assert p_heavy.memory_limit_bytes < p_plain.memory_limit_bytes
    assert "driver's measured size" in p_heavy.reasons[0]
    # a larger reserve setting still wins
    big = make_plan(heavy, res, PlanSettings(reserve_bytes=1 * GiB))
    assert big.reserve_bytes == 1 * GiB and "driver" not in big.reasons[0]


def test_a_zero_reserve_is_kept_when_the_allocation_does_not_hold_the_driver() -> None:
    """An existing cluster's workers (memory = the sum of their limits): no driver there."""
    res = alloc(4 * GiB, 2)
    heavy = Footprint(
        "w", "item", 1000, per_item_bytes=MiB, baseline_bytes=200 * MiB, driver_bytes=400 * MiB
    )
    plan = make_plan(heavy, res, PlanSettings(reserve_bytes=0))
    assert plan.reserve_bytes == 0
    assert plan.n_workers * plan.memory_limit_bytes == res.memory_bytes


# ------------------------------------------------ what to request (units) ----


@pytest.mark.parametrize(
    ("need", "expected"),
    [
        (1, "1G"),
        (GiB - 1, "1G"),
        (GiB, "1G"),
        (GiB + 1, "2G"),
        (2 * GB, "2G"),  # 1.86 GiB
        (int(2.1 * GB), "2G"),  # 1.96 GiB: 2G = 2.15 GB covers "2.1 GB"
        (2 * GiB, "2G"),
        (2 * GiB + 1, "3G"),
        (int(2.2 * GB), "3G"),  # 2.05 GiB
        (16 * GiB + MiB, "17G"),
    ],
)
def test_slurm_mem_is_the_smallest_whole_gib_that_covers_the_need(need, expected) -> None:
    """SLURM's --mem=NG is N GiB: the suggestion is never below the need."""
    got = slurm_mem(need)
    assert got == expected
    n = int(got.removesuffix("G"))
    assert n * GiB >= need and (n == 1 or (n - 1) * GiB < need)


@pytest.mark.parametrize(
    "target", [2 * GB - 10, 2 * GB + 10, int(2.1 * GB), 2 * GiB - 10, 2 * GiB, 2 * GiB + 10]
)
def test_the_infeasible_message_states_the_need_in_the_units_it_suggests(target) -> None:
    """'needs at least 2.1 GB ... request --mem=2G' read as too little: the need is given in
    GiB too (rounded up), and the suggested --mem (whole GiB, rounded up) covers both."""
    fp = Footprint("w", "item", 10, per_item_bytes=1, baseline_bytes=int(target * 0.6) - 1)
    st_ = PlanSettings(reserve_bytes=0, n_workers=1)
    need = min_memory_bytes(fp, st_)
    assert abs(need - target) < 10
    with pytest.raises(PlanInfeasibleError) as err:
        make_plan(fp, alloc(need - 1, 1), st_)
    message = str(err.value)
    shown_gb = float(message.split("needs at least ")[1].split(" GB")[0])
    shown_gib = float(message.split(" GB (")[1].split(" GiB")[0])
    has_gb = float(message.split("the allocation has ")[1].split(" GB")[0])
    requested = int(message.split("request --mem=")[1].split("G")[0])
    assert shown_gb * GB >= need and shown_gib * GiB >= need
    assert has_gb < shown_gb  # never "needs 2.1 GB but has 2.1 GB"
    assert requested >= shown_gib and requested * GiB >= need
    assert "SLURM's G is GiB" in message
    check_infeasible(err.value, fp, alloc(need - 1, 1), st_)


# ------------------------------------------------ an existing cluster's workers ----


def workers_alloc(*limits: int, threads: int = 1) -> Resources:
    """What hpcbatch.cluster.cluster_resources gives for workers of these memory limits."""
    workers = tuple(
        Worker(f"tcp://127.0.0.1:{4000 + i}", f"tcp://127.0.0.1:{4000 + i}", limit, threads)
        for i, limit in enumerate(limits)
    )
    return Resources(
        memory_bytes=sum(limits),
        memory_source="memory_limit of the cluster's workers (test)",
        cpus=threads * len(limits),
        cpus_source="threads of the cluster's workers (test)",
        workers=workers,
    )


def test_a_plan_for_existing_workers_keeps_their_count_threads_and_limit() -> None:
    """Even when the settings would choose otherwise (8 workers, a reserve, threads)."""
    res = workers_alloc(450 * MiB, 450 * MiB)
    fp = Footprint(
        "w", "item", 3000, per_item_bytes=100_000, baseline_bytes=150 * MiB,
        shared_input_bytes=50 * MiB, shared_input_mmap=True, driver_bytes=400 * MiB,
    )  # fmt: skip
    st_ = PlanSettings(n_workers=8, threads_per_worker=2, max_threads_per_worker=4)
    plan = make_plan(fp, res, st_)
    assert plan.n_workers == 2 and plan.threads_per_worker == 1
    assert plan.memory_limit_bytes == 450 * MiB  # not (900 MiB - 50 MiB node-shared) / 2
    assert plan.reserve_bytes == 0
    assert plan.predicted_peak_bytes <= plan.memory_fraction * 450 * MiB
    assert "workers: 2, planned for the existing cluster's 2 workers of 450.00 MiB each" in (
        plan.reasons
    )
    assert plan.to_dict()["resources"]["workers"][0]["memory_limit_bytes"] == 450 * MiB


def test_workers_of_unequal_limits_are_planned_for_the_smallest() -> None:
    plan = make_plan(
        Footprint("w", "item", 100, per_item_bytes=MiB, baseline_bytes=100 * MiB),
        workers_alloc(1 * GiB, 450 * MiB, 2 * GiB, threads=2),
    )
    assert (plan.n_workers, plan.threads_per_worker) == (3, 2)
    assert plan.memory_limit_bytes == 450 * MiB
    assert 2 * plan.chunk_size * MiB + 100 * MiB <= 0.6 * 450 * MiB


def test_a_chunk_too_large_for_the_workers_says_what_limit_to_start_them_with() -> None:
    fp = Footprint("w", "item", 3000, per_item_bytes=MiB, baseline_bytes=150 * MiB)
    res = workers_alloc(450 * MiB, 450 * MiB)
    with pytest.raises(PlanInfeasibleError) as err:
        make_plan(fp, res, PlanSettings(chunk_size=400))
    message = str(err.value)
    assert "\n" not in message and "request --mem" not in message
    assert "lower the chunk size below 400" in message
    need_mib = int(message.split("--memory-limit ")[1].split("MiB")[0])
    assert need_mib * MiB > 450 * MiB
    # workers of exactly that limit take the chunk; 1 MiB less does not
    plan = make_plan(
        fp, workers_alloc(need_mib * MiB, need_mib * MiB), PlanSettings(chunk_size=400)
    )
    assert plan.chunk_size == 400 and plan.memory_limit_bytes == need_mib * MiB
    with pytest.raises(PlanInfeasibleError):
        make_plan(fp, workers_alloc((need_mib - 1) * MiB), PlanSettings(chunk_size=400))


def test_workers_without_a_memory_limit_share_the_given_memory() -> None:
    res = dataclasses.replace(workers_alloc(0, 0), memory_bytes=8 * GiB)
    plan = make_plan(Footprint("w", "item", 100, per_item_bytes=MiB, baseline_bytes=MiB), res)
    assert plan.n_workers == 2 and plan.memory_limit_bytes == 4 * GiB and plan.reserve_bytes == 0
    assert any("no memory limit on them" in r for r in plan.reasons)
