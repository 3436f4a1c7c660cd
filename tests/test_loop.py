"""The shared training loop: hooks see every step and epoch and their dicts land
in the history, gradient accumulation equals one big batch, the lr schedule
and max_steps are followed, the time budget stops the run, EMA and checkpoints."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from onnxprune.torchbridge.loop import EMA, Checkpoint, fit  # noqa: E402


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return torch.utils.data.TensorDataset(x, x @ torch.randn(5, 3, generator=g) + 0.1 * torch.randn(n, 3, generator=g))


def _model(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 3)


def _mse(model):
    return lambda batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1])


class Recorder:
    def __init__(self):
        self.steps, self.epochs = [], []

    def after_step(self, step):
        self.steps.append(step)

    def end_epoch(self, epoch, record):
        self.epochs.append((epoch, record["step"]))
        return {"marker": 10 * epoch}


class OnlySteps:  # a hook with one of the two methods
    def __init__(self):
        self.n = 0

    def after_step(self, step):
        self.n += 1


def test_hooks_see_every_step_and_epoch_and_extend_the_history():
    model = _model()
    loader = torch.utils.data.DataLoader(_data(), batch_size=4, shuffle=True)  # 8 micro-batches
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec, only = Recorder(), OnlySteps()
    lrs = lambda s, t: 0.1 * (1 - s / t)  # noqa: E731
    run = fit(model, loader, opt, _mse(model), epochs=3, steps_per_epoch=4, accum=2, lr_at=lrs, hooks=[rec, only])
    assert run.step == 12 and run.epoch == 3 and only.n == 12
    assert rec.steps == list(range(1, 13))
    assert rec.epochs == [(1, 4), (2, 8), (3, 12)]
    assert [h["marker"] for h in run.history] == [10, 20, 30]
    assert [h["step"] for h in run.history] == [4, 8, 12] and [h["epoch"] for h in run.history] == [1, 2, 3]
    assert [h["lr"] for h in run.history] == pytest.approx([lrs(3, 12), lrs(7, 12), lrs(11, 12)])  # the epoch's last step
    assert run.history[-1]["loss"] < run.history[0]["loss"]  # it trains
    # max_steps cuts the run (and the schedule's length) mid-epoch; a resumed run continues the count
    model2 = _model()
    rec2 = Recorder()
    run2 = fit(model2, loader, torch.optim.SGD(model2.parameters(), lr=0.1), _mse(model2), epochs=3, steps_per_epoch=4,
               max_steps=10, hooks=[rec2], start_step=2, start_epoch=1)
    assert rec2.steps == list(range(3, 11)) and rec2.epochs == [(2, 6), (3, 10)] and run2.step == 10


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_accumulating_micro_batches_equals_one_big_batch(momentum):
    ds = _data(16)
    weights = []
    for micro, accum in ((8, 1), (2, 4), (2, 1)):
        model = _model()
        loader = torch.utils.data.DataLoader(ds, batch_size=micro, shuffle=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=momentum)
        run = fit(model, loader, opt, _mse(model), epochs=1, steps_per_epoch=2, accum=accum)
        assert run.step == 2
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    big, accumulated, small = weights
    assert torch.allclose(big, accumulated, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(big, small, rtol=1e-3, atol=1e-4)  # the batches differ: the test can tell


class _FakeClock:
    """Stands in for the loop's ``time`` module: ``perf_counter`` reads ``t``,
    which only the test moves (no wall-clock reading in the check)."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        return self.t


def test_time_budget_refits_the_schedule_and_stops_the_run(monkeypatch):
    from onnxprune.torchbridge import loop

    clock = _FakeClock()
    monkeypatch.setattr(loop, "time", clock)
    model = _model()
    loader = torch.utils.data.DataLoader(_data(), batch_size=4, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mse = _mse(model)
    cost = 2.0 ** -6  # seconds per micro-batch (exact in binary): a 1 s budget fits 64 steps

    def timed(batch):
        clock.t += cost
        return mse(batch)

    cosine = lambda s, t: 0.01 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / t)))  # noqa: E731
    seen = []
    run = fit(model, loader, opt, timed, epochs=10**6, steps_per_epoch=8, lr_at=lambda s, t: seen.append((s, t)) or cosine(s, t),
              budget_s=1.0, max_steps=400)  # a loop that ignored the budget would run 400 steps
    # at step 5 the measured speed (5 steps in 5/64 s) refits the schedule to 64 steps; it ends there, at the budget
    assert run.step == 64 and run.seconds == 1.0
    assert run.epoch == len(run.history) == 8
    assert [t for _, t in seen[:5]] == [400] * 5 and all(t == 64 for _, t in seen[5:])
    assert run.history[-1]["lr"] == pytest.approx(cosine(63, 64))  # the cosine ran to its end inside the budget
    # twice the cost per step: half the steps
    clock.t, seen = 0.0, []
    cost = 2.0 ** -5
    m2 = _model()
    run = fit(m2, loader, torch.optim.SGD(m2.parameters(), lr=0.01), timed, epochs=10**6, steps_per_epoch=8,
              lr_at=cosine, budget_s=1.0, max_steps=400)
    assert run.step == 32 and run.seconds == 1.0
    # the machine slows down after 10 steps (1/64 s -> 1/32 s a step): the refit at step 20 sees it
    # (30/64 s for 20 steps: 42 steps fit) and the run stops when the budget is spent, at step 37
    clock.t, seen, step_costs = 0.0, [], iter([2.0 ** -6] * 10 + [2.0 ** -5] * 1000)

    def slowing(batch):
        clock.t += next(step_costs)
        return mse(batch)

    run = fit(model, loader, opt, slowing, epochs=10**6, steps_per_epoch=8, lr_at=lambda s, t: seen.append(t) or cosine(s, t),
              budget_s=1.0, max_steps=400)
    assert run.step == 37 and run.seconds == 1.0
    assert seen[:5] == [400] * 5 and seen[5:20] == [64] * 15 and seen[20:] == [42] * 17


class Snapshots:
    def __init__(self, model):
        self.model, self.states = model, []

    def after_step(self, step):
        self.states.append({k: v.clone() for k, v in self.model.state_dict().items()})


def test_ema_and_checkpoint_hooks(tmp_path):
    model = _model()
    expect = {k: v.clone() for k, v in model.state_dict().items()}
    loader = torch.utils.data.DataLoader(_data(8), batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema, snaps = EMA(model, 0.75), Snapshots(model)
    ckpt = Checkpoint(str(tmp_path / "c.ckpt"), model, opt, ema, extra={"note": "x"})
    run = fit(model, loader, opt, _mse(model), epochs=2, steps_per_epoch=1, hooks=[snaps, ema, ckpt])
    assert run.step == 2 and len(snaps.states) == 2
    for w in snaps.states:
        expect = {k: 0.75 * expect[k] + 0.25 * w[k] for k in expect}
    assert all(torch.allclose(ema.state[k], expect[k]) for k in expect)
    assert torch.load(ckpt.path, weights_only=False)["note"] == "x"
    # resume into a fresh module / optimizer / EMA: the same state and counters come back
    model2 = _model(seed=5)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    ema2 = EMA(model2, 0.75)
    assert Checkpoint(ckpt.path, model2, opt2, ema2).load() == (2, 2)
    assert all(torch.equal(model2.state_dict()[k], snaps.states[-1][k]) for k in expect)
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(opt2.state_dict()["state"].values(), opt.state_dict()["state"].values()))
    assert all(torch.equal(ema2.state[k], ema.state[k]) for k in expect)
    ema.copy_to_module()
    assert all(torch.equal(model.state_dict()[k], ema.state[k]) for k in expect)
