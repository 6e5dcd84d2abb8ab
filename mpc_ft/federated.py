"""Federated mode: FedAvg of the head, each round's updates averaged under MPC (secure aggregation).

    mpc-ft demo --mode federated --rounds 3 --local-epochs 1
    job file: [train] mode = "federated"; [federated] rounds, local_epochs, min/max_examples

Protocol, run identically by every computing party (roles from the job file, by name):
1. The model owner shares its initial head and it is opened to every computing party (reveal
   log: "initial head" to all). From here on the global head is known to every participant:
   unlike full MPC training, federated mode does not keep the model owner's weights secret.
2. Each round r = 1..R:
   a. Each data owner i trains the global head locally, in plaintext, on its own features for
      E epochs (train.train with TorchOps; batch order seeded by the job seed, r and the epoch)
      and forms its update delta_i = local head - global head.
   b. Each owner shares one vector (src = its rank), with w_i = n_i / s for a public scale
      s = sqrt(min_examples * max_examples) (it keeps W and 1 / W near 1 in fixed point):
      [w_i, w_i * loss_i,e and w_i * accuracy_i,e for each local epoch e, w_i * delta_i].
      The other parties pass zeros of the public length.
   c. All parties add the vectors (locally), compute 1 / W for W = sum_i w_i by Newton's method
      over the public range [min_examples / s, max_examples / s] (ops.reciprocal_in_range) and
      multiply: sum_i n_i v_i / sum_i n_i, still shared.
   d. Opened to all through sharing.Revealer: the per-epoch mean loss and accuracy ("round r:
      mean loss and accuracy per local epoch") and the weighted average update ("round r:
      averaged update"). No owner's update, count, loss or weight is ever opened. Every party
      adds the average to its global head.
   In round 1, before anything else is opened, one bit is: whether sum_i n_i lies in the
   declared range (outside it the reciprocal would be wrong); if not, every party stops (exit 2).
3. Test accuracy: each owner evaluates the final global head on its own test features in
   plaintext and shares its count of correct predictions; only the sum is opened.
4. The model owner writes the final global head, which every participant already knows.

`simulate` is the plaintext twin: the same rounds, local training and seeds, with the exact
weighted average; tests and the demo compare the two.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from mpc_ft import train
from mpc_ft.config import FederatedConfig, JobConfig
from mpc_ft.errors import BadInput
from mpc_ft.ops import TorchOps, reciprocal_in_range, unflatten

Params = dict[str, torch.Tensor]


@dataclass
class FederatedHistory:
    """What every participant learns besides the global head: per local epoch (R * E values),
    the example-weighted mean over owners of the training loss and accuracy."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # per round
    local_steps: int = 0  # this party's own local SGD steps


def round_seed(seed: int, round_index: int) -> int:
    """The local batch order's seed in round `round_index` (0-based): a new order every round."""
    return seed * 1_009 + round_index


def local_update(
    global_params: Params, data: train.Dataset, job: JobConfig, round_index: int
) -> tuple[Params, train.History]:
    """One owner's round: E local epochs in plaintext from the global head; returns the update
    (local - global) and the local training history."""
    cfg = dataclasses.replace(job.train, epochs=job.federated.local_epochs,
                              seed=round_seed(job.train.seed, round_index))  # fmt: skip
    local, history = train.train(global_params, data, head=job.head, train_cfg=cfg, ops=TorchOps,
                                 reveal_scalars=train.plaintext_reveal)  # fmt: skip
    return {k: local[k] - global_params[k] for k in global_params}, history


def scale(fed: FederatedConfig) -> float:
    """The public scale s of the shared weights w_i = n_i / s."""
    return math.sqrt(fed.min_examples * fed.max_examples)


def contribution(
    count: int, update: Params, history: train.History, fed: FederatedConfig
) -> torch.Tensor:
    """An owner's shared vector: [w, w * loss_e..., w * accuracy_e..., w * update] (w = n / s)."""
    w = count / scale(fed)
    metrics = torch.tensor([1.0, *history.loss, *history.accuracy], dtype=torch.float32)
    flat = torch.cat([v.reshape(-1) for v in update.values()])
    return torch.cat([metrics, flat]) * w


def secure_weighted_mean(
    crypten: Any,
    fed: FederatedConfig,
    mine: torch.Tensor | None,
    length: int,
    owner_ranks: list[int],
    rank: int,
) -> tuple[Any, Any]:
    """Steps 2b-c: every owner's vector [w_i, w_i * v_i] (length + 1) shared; returns the shares
    of sum_i w_i v_i / sum_i w_i [length] and of W = sum_i w_i [1]. Nothing is opened."""
    from mpc_ft.sharing import share

    total = None
    for src in owner_ranks:
        part = share(crypten, mine if src == rank else None, (length + 1,), src)
        total = part if total is None else total + part
    s = scale(fed)
    weight = total.narrow(0, 0, 1)
    inverse = reciprocal_in_range(weight, fed.min_examples / s, fed.max_examples / s)
    return total.narrow(0, 1, length) * inverse, weight


TOTAL_IN_RANGE = "total training examples within [federated.min_examples, max_examples]"


def declared_reveals(job: JobConfig, shapes: dict[str, Any], test_examples: int) -> list[dict]:
    """Federated mode's reveal policy, in order (README, Federated mode; sharing.Revealer checks
    each reveal against it): the initial head, the total-count check, then per round the mean
    loss and accuracy per local epoch and the averaged update, then the test accuracy."""
    policy: list[dict[str, Any]] = [
        {"what": "initial head", "to": "all", "count": len(shapes)},
        {"what": TOTAL_IN_RANGE, "to": "all", "count": 1},  # in round 1 (rounds >= 1: config)
    ]
    for r in range(job.federated.rounds):
        policy += [
            {"what": f"round {r + 1}: mean loss and accuracy per local epoch", "to": "all",
             "count": 2 * job.federated.local_epochs},
            {"what": f"round {r + 1}: averaged update", "to": "all", "count": len(shapes)},
        ]  # fmt: skip
    if test_examples:
        policy.append({"what": "test accuracy", "to": "all", "count": 1})
    return policy


def check_total_in_range(weight: Any, fed: FederatedConfig, revealer: Any) -> None:
    """Open one bit: whether the total example count lies in the job's declared range."""
    s, slack = scale(fed), 1e-3  # w_i are fixed-point encodings: allow their rounding
    inside = weight.ge(fed.min_examples / s * (1 - slack)) * weight.le(
        fed.max_examples / s * (1 + slack)
    )
    (ok,) = revealer.scalars([inside.reshape(())], TOTAL_IN_RANGE)
    if ok < 0.5:
        raise BadInput(f"the data owners' training examples add up to a number outside "
                       f"[{fed.min_examples}, {fed.max_examples}] (federated.min_examples, "
                       "max_examples in the job file)")  # fmt: skip


def run_rounds(
    crypten: Any,
    job: JobConfig,
    rank: int,
    local: train.Dataset | None,
    initial: Any,
    revealer: Any,
    *,
    progress: bool = False,
) -> tuple[Params, FederatedHistory]:
    """Steps 1-2 on one computing party; `initial` is the shared initial head, `local` this
    party's own training features (None unless it is a data owner). Returns the global head."""
    fed = job.federated
    owner_ranks = [job.rank(p.name) for p in job.data_owners]
    global_params = revealer.tensors(initial, "initial head")
    shapes = {name: tuple(v.shape) for name, v in global_params.items()}
    size = sum(math.prod(s) for s in shapes.values())
    E = fed.local_epochs
    history = FederatedHistory()
    bar = tqdm(range(fed.rounds), desc="federated rounds", unit="round", disable=not progress)
    for r in bar:
        start = time.perf_counter()
        mine = None
        if local is not None:
            update, local_history = local_update(global_params, local, job, r)
            history.local_steps += local_history.steps
            mine = contribution(len(local), update, local_history, fed)
        mean, weight = secure_weighted_mean(crypten, fed, mine, 2 * E + size, owner_ranks, rank)
        if r == 0:
            check_total_in_range(weight, fed, revealer)
        what = f"round {r + 1}: mean loss and accuracy per local epoch"
        metrics = revealer.scalars([mean[i] for i in range(2 * E)], what)
        history.loss += metrics[:E]
        history.accuracy += metrics[E:]
        average = revealer.tensors(unflatten(mean.narrow(0, 2 * E, size), shapes),
                                   f"round {r + 1}: averaged update")  # fmt: skip
        global_params = {k: global_params[k] + average[k] for k in global_params}
        history.seconds.append(time.perf_counter() - start)
        if progress:
            tqdm.write(
                f"federated round {r + 1}: mean local loss {history.loss[-1]:.4f}, "
                f"accuracy {history.accuracy[-1]:.3f}, {history.seconds[-1]:.1f} s"
            )
    return global_params, history


def secure_test_accuracy(
    crypten: Any,
    job: JobConfig,
    rank: int,
    params: Params,
    test: train.Dataset | None,
    test_counts: list[int],
    revealer: Any,
) -> float | None:
    """Step 3: every owner's correct predictions on its own test set, summed; only the sum is
    opened. test_counts: each computing party's public test-set size, in rank order."""
    from mpc_ft.sharing import share

    if sum(test_counts) == 0:
        return None
    total = None
    for src, n in enumerate(test_counts):
        if n == 0:
            continue
        correct = None
        if src == rank and test is not None:
            accuracy = train.evaluate(params, test, head=job.head,
                                      batch_size=job.train.eval_batch_size, ops=TorchOps,
                                      reveal_scalars=train.plaintext_reveal)  # fmt: skip
            correct = torch.tensor([round(accuracy * len(test))], dtype=torch.float32)
        part = share(crypten, correct, (1,), src)
        total = part if total is None else total + part
    (opened,) = revealer.scalars([total.reshape(())], "test accuracy")
    return round(opened) / sum(test_counts)


def simulate(
    initial: Params, owners: list[train.Dataset], job: JobConfig
) -> tuple[Params, FederatedHistory]:
    """The plaintext twin: the same rounds with the exact example-weighted average."""
    fed = job.federated
    global_params = {k: v.clone() for k, v in initial.items()}
    history = FederatedHistory()
    total = sum(len(d) for d in owners)
    for r in range(fed.rounds):
        start = time.perf_counter()
        results = [local_update(global_params, d, job, r) for d in owners]
        for e in range(fed.local_epochs):
            history.loss.append(
                sum(len(d) * h.loss[e] for d, (_, h) in zip(owners, results, strict=True)) / total
            )
            history.accuracy.append(
                sum(len(d) * h.accuracy[e] for d, (_, h) in zip(owners, results, strict=True))
                / total
            )
        history.local_steps += sum(h.steps for _, h in results)
        global_params = {
            k: global_params[k]
            + sum(len(d) * u[k] for d, (u, _) in zip(owners, results, strict=True)) / total
            for k in global_params
        }
        history.seconds.append(time.perf_counter() - start)
    return global_params, history


def party_result(
    crypten: Any,
    job: JobConfig,
    name: str,
    local: dict[str, train.Dataset] | None,
    everyone: list[Any],
    width: int,
    out_dir: Any,
    progress: bool = False,
) -> dict[str, Any]:
    """One computing party's federated job (party.run calls it after CrypTen is up); returns the
    same result record as full MPC training. everyone: the handshake's public Hellos by rank."""
    from mpc_ft import compat, sharing
    from mpc_ft import head as head_def

    rank = job.rank(name)
    initial = None
    if "model_owner" in job.party(name).roles:
        initial = head_def.init_params(job.head, width, job.num_classes, job.train.seed)
    shapes = head_def.param_shapes(job.head, width, job.num_classes)
    t1 = time.perf_counter()
    shared = sharing.share_head(crypten, initial, shapes, job.rank(job.model_owner.name))
    seconds_sharing = time.perf_counter() - t1
    revealer = sharing.Revealer(
        job, rank, declared_reveals(job, shapes, sum(s.test for s in everyone))
    )
    compat.reset_communication_stats()
    t2 = time.perf_counter()
    params, history = run_rounds(crypten, job, rank, local["train"] if local else None, shared,
                                 revealer, progress=progress)  # fmt: skip
    seconds_train = time.perf_counter() - t2
    stats = compat.communication_stats()
    t3 = time.perf_counter()
    test = local.get("test") if local else None
    accuracy = secure_test_accuracy(crypten, job, rank, params, test,
                                    [s.test for s in everyone], revealer)  # fmt: skip
    seconds_eval = time.perf_counter() - t3
    if "model_owner" in job.party(name).roles:
        head_def.HeadModule(job.head, params, list(job.labels)).save(out_dir / "head")
    fed, batch = job.federated, job.train.batch_size
    return {
        "train_examples": sum(s.train for s in everyone),
        "test_examples": sum(s.test for s in everyone),
        "loss": history.loss,
        "train_accuracy": history.accuracy,
        "seconds_per_round": history.seconds,
        # every owner's local steps: public, from the handshake's example counts
        "steps": fed.rounds * fed.local_epochs * sum(-(-s.train // batch) for s in everyone),
        "local_steps": history.local_steps,
        "test_accuracy": accuracy,
        "seconds_sharing": seconds_sharing,
        "seconds_mpc_train": seconds_train,
        "seconds_eval": seconds_eval,
        "bytes_sent": stats["bytes"],
        "rounds": stats["rounds"],
        "federated_rounds": fed.rounds,
        "reveals": revealer.log,
    }
