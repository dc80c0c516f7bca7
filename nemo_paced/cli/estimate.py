"""`nemo-paced estimate`: ask a running rollout service to (re-)estimate pass rates, optionally wait."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "estimate", help="start a pass-rate estimation on a running rollout service (and wait for it)",
        description="Client of `nemo-paced serve-rollouts`. Optionally load new student weights first "
                    "(--checkpoint), then queue an estimation of all problems (or --ids) at K samples each. "
                    "With --wait, poll until the job is done and print a summary of the table. "
                    "Exit status: 0 done (or queued without --wait), 1 the job failed or timed out, "
                    "2 the service refused the request, 3 the service could not be reached.")
    parser.add_argument("--service", required=True,
                        help="address file written by serve-rollouts --address-file, or a URL http://host:port")
    parser.add_argument("--checkpoint", help="load these weights (a directory on the service's machine) first")
    parser.add_argument("--step", type=int, help="training step of --checkpoint, recorded with the estimates")
    parser.add_argument("--ids", nargs="+", help="problem ids to estimate (default: all)")
    parser.add_argument("--ids-file", help="file with one problem id per line (default: all)")
    parser.add_argument("--problems", metavar="FILE",
                        help="estimate the problems of this file (e.g. the training pool alone, without the "
                             "test problems the service also holds for evaluation)")
    parser.add_argument("--k", type=int, help="samples per problem (default: the service's --k)")
    parser.add_argument("--wait", action="store_true", help="wait until the estimation is done")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between progress polls (default 2)")
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    parser.add_argument("--out", help="after --wait, save a copy of the service's pass-rate table here (JSONL)")
    parser.set_defaults(handler=estimate)


def estimate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nemo_paced.rollout.client import JobFailed, RequestRejected, RolloutClient, ServiceUnavailable

    ids = list(args.ids or [])
    if args.ids_file:
        ids += [line.strip() for line in Path(args.ids_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.problems:
        from nemo_paced.problems import load_problems

        ids += [p.id for p in load_problems(args.problems)]
    try:
        with RolloutClient.connect(args.service) as client:
            if args.checkpoint:
                loaded = client.load_weights(args.checkpoint, step=args.step)
                print(f"loaded weights {loaded['checkpoint']} (step {loaded['step']})", file=sys.stderr)
            job_id = client.estimate(ids or None, k=args.k)
            print(job_id, flush=True)
            if not args.wait:
                return 0
            status = client.wait(job_id, poll=args.poll, timeout=args.timeout, progress=_progress)
            table = client.refresh_table()
            done = [table[i] for i in (ids or [r.problem_id for r in table.records()]) if i in table]
            mean = sum(r.pass_rate for r in done) / len(done) if done else float("nan")
            print(f"job {job_id} done: {status['total']} problems, table version {table.version}, "
                  f"mean pass rate {mean:.3f}, checkpoints {', '.join(status['checkpoints'])}", file=sys.stderr)
            if "rollouts" in status:
                asked = (status["total"] + status.get("left_out", 0)) * status["k"]
                print(f"rollouts: {status['rollouts']} spent, {status.get('saved', 0)} saved against K={status['k']} "
                      f"for every problem ({asked}); {status.get('left_out', 0)} confident problems kept their "
                      "estimate", file=sys.stderr)
            if done and all(r.successes in (0, r.trials) for r in done):
                print(degenerate_warning(done), file=sys.stderr)
            if args.out:
                table.save(args.out)
    except RequestRejected as e:
        return _fail(e, 2)
    except ServiceUnavailable as e:
        return _fail(e, 3)
    except (JobFailed, TimeoutError) as e:
        return _fail(e, 1)
    except (OSError, ValueError) as e:  # an unreadable address or ids file
        return _fail(e, 2)
    return 0


def degenerate_warning(records) -> str:
    """Why a table where every pass rate is 0 or 1 trains nothing, and what usually causes it."""
    zeros = sum(r.successes == 0 for r in records)
    return (f"warning: every pass rate is 0 or 1 ({zeros} of {len(records)} at 0): w(p) = 0 for every problem, so "
            "PACED has nothing to train on. All zeros usually mean the service's --template, --verifier or "
            "--max-tokens do not fit the model (it warns at start when prompts are mostly unknown tokens or "
            "longer than its context); all ones, that the problems are too easy for it.")


def _fail(error: Exception, status: int) -> int:
    print(f"nemo-paced estimate: {error}", file=sys.stderr)
    return status


def _progress(status: dict) -> None:
    print(f"  {status['status']}: {status['done']}/{status['total']} problems", file=sys.stderr, flush=True)
