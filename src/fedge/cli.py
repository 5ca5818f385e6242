"""The ``fedge`` command line: parse, build a config, call one library function.

Expected failures (a bad flag, a malformed file, an unknown name) print one
line ``fedge: error: ...`` and exit with status 2; failures inside training
exit with status 1; Ctrl-C exits with 130 after saying what was kept. No
traceback for any of them. Heavy imports happen inside the subcommands, so
``fedge --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge import __version__
from fedge.errors import ConfigError, FedgeError

if TYPE_CHECKING:
    from fedge.sim.engine import RoundRecord, SimResult

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _option(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip().replace("-", "_"), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}: expected a number, got {value!r}") from None


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _add_simulate(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federation of virtual devices on this machine",
        description=(
            "Simulate federated training over virtual devices. With no arguments: digits data, "
            "logistic regression, 20 devices with a Dirichlet(0.5) label skew, all devices every "
            "round, 30 rounds of FedAvg. Writes metrics.jsonl, summary.json, model.safetensors "
            "and curves.png to --out. Settings come from defaults, then --config, then flags."
        ),
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("problem")
    g.add_argument("--task", help="logreg, mlp, mlp:HIDDEN, torch-cnn, or module:attr (default logreg)")
    g.add_argument("--data", help="digits, synthetic:ALPHA,BETA, synthetic:iid, or a .npz/.csv file "
                   "(default digits)")
    g.add_argument("--partition", help="iid, dirichlet:ALPHA, shards:K or powerlaw:A "
                   "(default dirichlet:0.5; synthetic data comes partitioned)")
    g.add_argument("--devices", type=int, help="number of virtual devices (default 20)")
    g = p.add_argument_group("rounds")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--cohort", type=int, metavar="N", help="devices per round, uniformly at random "
                   "(default: every device)")
    x.add_argument("--sample-rate", type=_fraction, metavar="Q",
                   help="each device joins a round with probability Q (Poisson sampling)")
    g.add_argument("--rounds", type=int, help="rounds to run (default 30)")
    g.add_argument("--stragglers", type=_fraction, metavar="FRACTION",
                   help="fraction of each cohort that runs fewer local epochs (default 0)")
    g.add_argument("--drop-stragglers", action="store_true",
                   help="discard stragglers' partial work (FedAvg in the FedProx paper)")
    g.add_argument("--eval-every", type=int, metavar="K",
                   help="evaluate centrally every K rounds and after the last (default 1)")
    g = p.add_argument_group("local training")
    g.add_argument("--local-epochs", type=int, help="local epochs per round (default 1)")
    g.add_argument("--batch-size", type=int, help="local minibatch size (default 32)")
    g.add_argument("--lr", type=_fraction, help="local learning rate (default 0.1)")
    g.add_argument("--mu", type=_fraction, help="FedProx proximal coefficient "
                   "(default 0; 0.01 with --strategy fedprox)")
    g = p.add_argument_group("server")
    g.add_argument("--strategy", help="fedavg, fedavgm, fedadagrad, fedadam, fedyogi, fedprox, or a "
                   "robust rule: median, trimmed-mean[:BETA], krum, multi-krum[:M], bulyan, "
                   "norm-bound:M[:INNER]; a robust rule may mix updates first: median:mix=nnm, "
                   "median:bucket=2; any option also as NAME:KEY=VALUE (default fedavg; see "
                   "docs/robustness.md)")
    g.add_argument("--server-lr", type=_fraction, help="server learning rate (default: the "
                   "strategy's: 1 for fedavg/fedavgm/fedprox, 0.1 fedadagrad, 0.01 fedadam/fedyogi)")
    g.add_argument("--strategy-option", type=_option, action="append", dest="strategy_options",
                   metavar="KEY=VALUE", help="a strategy hyperparameter, e.g. momentum=0.9, "
                   "beta1=0.9, beta2=0.99, tau=0.001 (repeatable)")
    g = p.add_argument_group("update encoding")
    g.add_argument("--compress", metavar="SPEC",
                   help="none, fp16, q8, q4, topk:FRACTION (with error feedback), or top-k then a "
                   "value coder: topk:0.01+fp16 (default none); see docs/compression.md")
    g.add_argument("--compress-bucket", type=int, metavar="N",
                   help="q8/q4: one quantization scale per N values (default: one per tensor)")
    g.add_argument("--compress-range", type=_fraction, metavar="R",
                   help="q8/q4: quantize on the shared grid [-R, R] (no per-device scales)")
    g.add_argument("--count-bytes", choices=["wire", "raw", "off"],
                   help="bytes up/down: wire = every payload serialized and zstd-compressed (exact), "
                   "raw = before zstd (cheaper on large models), off (default wire)")
    g = p.add_argument_group("differential privacy (docs/privacy.md)")
    g.add_argument("--dp", choices=["central", "distributed", "local"],
                   help="clip every update and add Gaussian noise: to the sum on the server (central), "
                   "as shares under secure aggregation (distributed, needs --secagg) or on each "
                   "device (local)")
    g.add_argument("--clip-norm", metavar="C|adaptive",
                   help="L2 bound on an update, or 'adaptive' (Andrew et al. 2021) (default 1.0)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--noise-multiplier", type=_fraction, metavar="Z", help="noise stddev / clip norm")
    x.add_argument("--target-epsilon", type=_fraction, metavar="E",
                   help="calibrate the noise multiplier so that --rounds rounds reach epsilon E")
    g.add_argument("--delta", type=_fraction, help="delta of the reported epsilon (default 1e-5)")
    g.add_argument("--epsilon-budget", type=_fraction, metavar="E",
                   help="stop before a round that would take epsilon past E (default: --target-epsilon)")
    g.add_argument("--accountant", choices=["rdp", "pld"], help="privacy accountant (default rdp)")
    g.add_argument("--dp-min-contributors", type=int, metavar="M",
                   help="--dp distributed: uploads each device's noise share assumes, capped at the "
                   "round's cohort; a round with fewer is abandoned (default: the secagg threshold)")
    g = p.add_argument_group("attack")
    g.add_argument("--attack", metavar="SPEC", help="what malicious devices do: sign-flip:SCALE, "
                   "scale:FACTOR, gaussian:SIGMA or label-flip (default: no attack)")
    g.add_argument("--malicious", type=_fraction, metavar="FRACTION",
                   help="fraction of devices that are malicious, drawn from the seed (with --attack)")
    g = p.add_argument_group("device heterogeneity and the virtual clock (docs/simulator.md)")
    g.add_argument("--profiles", metavar="SPEC|FILE",
                   help="device profiles: lognormal-speed:SPREAD[:MEDIAN], diurnal[:HOURS], dropout:P, "
                   "bandwidth:MBPS[:SPREAD] (comma-separated), or a .csv/.json trace; every round then "
                   "has a simulated duration")
    g.add_argument("--deadline-s", type=_fraction, metavar="S",
                   help="simulated round deadline: devices that would take longer drop out")
    g.add_argument("--selection", choices=["random", "deadline"],
                   help="cohort selection: uniformly at random, or preferring devices expected to "
                   "finish before --deadline-s (default random)")
    g.add_argument("--fairness", type=_fraction, metavar="F",
                   help="with --selection deadline: share of places for the longest-waiting devices "
                   "(default 0.2)")
    g = p.add_argument_group("secure aggregation (docs/secagg.md)")
    g.add_argument("--secagg", action="store_true",
                   help="SecAgg+: every device's key agreement, secret sharing and masking really "
                   "run; the server sees only the masked sum")
    g.add_argument("--secagg-k", type=int, metavar="K", help="neighbours per device, even "
                   "(default: from the cohort size, see docs/secagg.md)")
    g.add_argument("--secagg-threshold", type=int, metavar="T",
                   help="shares needed to rebuild a secret (default K/2 + 1)")
    g.add_argument("--secagg-clip", type=_fraction, metavar="C",
                   help="each update value is clipped to [-C, C] before quantization (default 1)")
    g.add_argument("--secagg-bits", type=int, metavar="B", help="signed bits per value on the "
                   "shared grid (default: the most that cannot wrap for the cohort, up to 24)")
    g.add_argument("--secagg-dropout", type=_option, action="append", metavar="PHASE=FRACTION",
                   help="simulated dropout before a phase: advertise, share, upload (after "
                   "sharing keys) or unmask (after uploading); repeatable")
    g = p.add_argument_group("run")
    g.add_argument("--backend", choices=["inline", "processes", "ray", "auto"],
                   help="inline: one process, bit-for-bit reproducible; processes: every core; "
                   "ray: a Ray cluster (pip install 'fedge[ray]'); auto: inline or processes by "
                   "the run's estimated cost, ray with --ray-address (default inline)")
    g.add_argument("--workers", type=int, help="worker processes for --backend processes "
                   "(default: one per core)")
    g.add_argument("--ray-address", metavar="auto|HOST:PORT",
                   help="join this Ray cluster ('auto': the one started on this machine); "
                   "default: start a local Ray instance")
    g.add_argument("--ray-cpus-per-device", type=_fraction, metavar="F",
                   help="CPUs each Ray worker reserves (default 1); cluster CPUs / F workers")
    g.add_argument("--ray-on-failure", choices=["retry", "dropout"],
                   help="a Ray worker lost mid-round: retry its devices (default) or count them "
                   "as dropped out")
    g.add_argument("--seed", type=int, help="seed for data split, selection and training (default 0)")
    g.add_argument("--config", type=Path, metavar="FILE.toml",
                   help="TOML file of settings (keys as the long flags, - or _)")
    g.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default: a new folder under runs/)")
    g.add_argument("--no-plot", action="store_true", help="skip curves.png")
    g.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_cmd_simulate)


def _build_config(args: argparse.Namespace) -> Any:
    from fedge.sim.config import SimConfig, load_toml

    values: dict[str, Any] = {}
    if "config" in args:
        values.update(
            SimConfig.from_mapping(load_toml(args.config), source=str(args.config)).to_dict()
        )
    flags = {
        k: v for k, v in vars(args).items()
        if k not in {"config", "out", "no_plot", "quiet", "func", "command", "verbose", "started_at",
                     "log_level", "log_format"}
    }
    if "strategy_options" in flags:
        merged = dict(values.get("strategy_options", {}))
        merged.update(dict(flags.pop("strategy_options")))
        flags["strategy_options"] = merged
    if "secagg_dropout" in flags:
        merged = dict(values.get("secagg_dropout", {}))
        merged.update(dict(flags.pop("secagg_dropout")))
        flags["secagg_dropout"] = merged
    values.update(flags)
    return SimConfig(**values)


def _single_threaded_blas() -> None:
    """One BLAS thread unless the user exported their own setting.

    numpy is not imported yet when a subcommand starts, so this takes effect.
    """
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


def _cmd_simulate(args: argparse.Namespace) -> int:
    # A simulated device's matmuls are tiny; a multi-threaded BLAS spends more
    # on waking its threads than it saves (3.4x slower for 1,000 devices with a
    # 1M-parameter MLP on 2 cores).
    _single_threaded_blas()
    from fedge.sim.backends import tune_malloc
    from fedge.sim.engine import Simulation

    tune_malloc()  # the driver's per-round arrays reuse memory, as the workers' do
    from fedge.sim.report import RunWriter, default_out_dir

    if "no_plot" not in args and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(
            "curves.png needs matplotlib, which is not installed: "
            "pip install 'fedge[sim]', or pass --no-plot"
        )
    config = _build_config(args)
    sim = Simulation(config)
    out_dir = args.out if "out" in args else default_out_dir(
        Path("runs"), f"{config.task.replace(':', '-')}-{config.data.split(':')[0]}"
    )
    writer = RunWriter(Path(out_dir))
    show = _Progress(config.rounds, enabled="quiet" not in args)

    def on_round(record: RoundRecord) -> None:
        writer.on_round(record)
        show.update(record)

    try:
        with show:
            result = sim.run(on_round=on_round)
    except KeyboardInterrupt:
        writer.close()
        print(f"fedge: interrupted; metrics so far are in {writer.out_dir}/metrics.jsonl",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException:
        writer.close()
        raise
    paths = writer.finish(result, plot="no_plot" not in args, started_at=args.started_at)
    if result.stopped is not None:
        print(f"fedge: {result.stopped}", file=sys.stderr)
    _print_result(result, paths)
    return EXIT_OK


def _print_result(result: SimResult, paths: dict[str, Path]) -> None:
    m = result.metrics
    privacy = "" if result.privacy is None else (
        f"  epsilon {result.privacy['epsilon']:.4g} at delta {result.privacy['delta']:g}"
    )
    print(
        f"final accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}  "
        f"after {len(result.history)} rounds, {result.num_devices} devices, "
        f"{result.timing['wall_s']:.2f} s{privacy}"
    )
    print(f"outputs in {paths['summary'].parent}/ ({', '.join(p.name for p in paths.values())})")


class _Progress:
    """A progress bar with round, accuracy and loss on a terminal; sparse lines otherwise."""

    def __init__(self, rounds: int, *, enabled: bool) -> None:
        self.rounds = rounds
        self.enabled = enabled
        self._bar: Any = None
        self._task: Any = None
        self._next_line = 0.0

    def __enter__(self) -> _Progress:
        # Without rich (a core install), fall back to the plain lines below.
        if self.enabled and sys.stderr.isatty() and importlib.util.find_spec("rich") is not None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                TextColumn("round"), MofNCompleteColumn(), BarColumn(),
                TextColumn("acc {task.fields[acc]}  loss {task.fields[loss]}"),
                TimeElapsedColumn(), console=Console(stderr=True), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("rounds", total=self.rounds, acc="-", loss="-")
        return self

    def update(self, record: RoundRecord) -> None:
        if not self.enabled:
            return
        acc = loss = "-"
        if record.metrics is not None:
            acc, loss = f"{record.metrics['accuracy']:.4f}", f"{record.metrics['loss']:.4f}"
        if self._bar is not None:
            fields: dict[str, str] = {} if record.metrics is None else {"acc": acc, "loss": loss}
            self._bar.update(self._task, completed=record.round, **fields)
            return
        # Not a terminal (CI, a log file): a line about every 10% of the run.
        if record.round >= self._next_line or record.round == self.rounds:
            print(f"round {record.round}/{self.rounds}  acc {acc}  loss {loss}", file=sys.stderr)
            self._next_line = record.round + max(1, self.rounds // 10)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _log_format_flag(p: argparse.ArgumentParser) -> None:
    """``--log-format`` after a service's subcommand too: ``fedge agent --log-format json``."""
    p.add_argument("--log-format", choices=("console", "json"), default=argparse.SUPPRESS,
                   help="console lines, or one JSON object per line (journald, Fluentd, rsyslog)")


def _add_coordinator(sub: Any) -> None:
    p = sub.add_parser(
        "coordinator",
        help="run the coordinator service (rounds over HTTP)",
        description=(
            "Serve federated rounds to device agents over the /v1 HTTP API. Settings come from "
            "--config coordinator.toml (see docs/federation.md), then flags. A restarted coordinator "
            "resumes after the last complete round in its data directory."
        ),
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", type=Path, metavar="FILE.toml", help="coordinator settings")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8080; 0 picks a free one)")
    p.add_argument("--data-dir", help="where the store and checkpoints live (default ./fedge-data)")
    p.add_argument("--rounds", type=int, help="rounds to complete (default 20)")
    p.add_argument("--exit-when-done", action="store_true",
                   help="exit once every round is complete (after telling the agents)")
    p.add_argument("--insecure", action="store_true",
                   help="serve plain HTTP and trust the X-Fedge-Device header (loopback only; warns)")
    p.add_argument("--insecure-allow-remote", action="store_true",
                   help="with --insecure, allow a non-loopback listen address")
    _log_format_flag(p)
    p.set_defaults(func=_cmd_coordinator, log_level=logging.INFO)


def _cmd_coordinator(args: argparse.Namespace) -> int:
    # Aggregation is one axpy per update, memory-bound: BLAS threads only
    # contend with the event loop (1.9 ms per 100K-value axpy with two
    # threads under load, 0.02 ms with one).
    _single_threaded_blas()
    from fedge.coordinator.config import load_coordinator_config

    overrides = {k: v for k, v in vars(args).items()
                 if k in {"host", "port", "data_dir", "rounds", "insecure", "insecure_allow_remote"}}
    config = load_coordinator_config(getattr(args, "config", None), overrides)
    from fedge.coordinator.server import serve

    return serve(config, exit_when_done="exit_when_done" in args)


def _data_dir_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--data-dir", metavar="DIR", help="the coordinator's data directory")
    g.add_argument("--config", type=Path, metavar="FILE.toml",
                   help="the coordinator's config (for its data_dir)")


def _data_dir(args: argparse.Namespace) -> str:
    if args.data_dir is not None:
        return str(args.data_dir)
    from fedge.coordinator.config import load_coordinator_config

    return load_coordinator_config(args.config).data_dir


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 30m, 24h or 7d, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive, got {text!r}")
    return value


def _add_admin(sub: Any) -> None:
    ca = sub.add_parser("ca", help="the coordinator's certificate authority",
                        description="Create the fedge CA, and sign the coordinator's server certificate.")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)
    p = ca_sub.add_parser("init", help="create the CA and the admin token in the data directory",
                          description="Create a private CA (ca/ca.key, mode 0600, and ca/ca.crt) and an "
                          "admin "
                          "token (printed once; kept in admin.token, mode 0600) in the coordinator's data "
                          "directory. Prints the CA's SHA-256 fingerprint for agents to pin.")
    _data_dir_args(p)
    p.set_defaults(func=_cmd_ca_init)
    p = ca_sub.add_parser("issue-server", help="sign the coordinator's TLS server certificate",
                          description="Sign a server certificate (tls/server.crt, key tls/server.key) for "
                          "the names and addresses agents use to reach the coordinator.")
    _data_dir_args(p)
    p.add_argument("--host", action="append", default=[], metavar="NAME", help="a DNS name (repeatable)")
    p.add_argument("--ip", action="append", default=[], metavar="ADDR", help="an IP address (repeatable)")
    p.set_defaults(func=_cmd_ca_issue_server)

    tok = sub.add_parser("token", help="enrolment tokens", description="Create one-time enrolment tokens.")
    tok_sub = tok.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    p = tok_sub.add_parser("create", help="create an enrolment token (printed once)",
                           description="Create an enrolment token; the store keeps only its hash.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _data_dir_args(p)
    p.add_argument("--expires", type=_duration, default=86400.0, metavar="DURATION",
                   help="validity, e.g. 30m, 24h, 7d (seconds)")
    p.add_argument("--uses", type=int, default=1, help="how many enrolments it allows")
    p.add_argument("--device-id", metavar="ID",
                   help="bind it to one device id (needed to enrol a revoked or lost device again)")
    p.set_defaults(func=_cmd_token_create)

    dev = sub.add_parser("device", help="enrolled devices; a device's own status",
                         description="List and revoke devices (coordinator); show a device's status (agent).")
    dev_sub = dev.add_subparsers(dest="device_command", metavar="COMMAND", required=True)
    p = dev_sub.add_parser("list", help="list the devices the coordinator knows")
    _data_dir_args(p)
    p.set_defaults(func=_cmd_device_list)
    p = dev_sub.add_parser("revoke", help="revoke a device: its next request is refused")
    _data_dir_args(p)
    p.add_argument("device_id", metavar="ID")
    p.set_defaults(func=_cmd_device_revoke)
    p = dev_sub.add_parser(
        "status", help="on a device: its readings, profile and training verdict",
        description=("Run on the device itself: read CPU load, memory, power, temperature and disk as the "
                     "agent does, show the capability profile it last measured, and say whether its "
                     "[policy] allows training now, and if not, why."),
    )
    p.add_argument("--config", type=Path, required=True, metavar="FILE.toml", help="the agent's settings")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_device_status)


def _cmd_ca_init(args: argparse.Namespace) -> int:
    from fedge.coordinator.identity import init_ca, tls_files

    data_dir = _data_dir(args)
    ca, token = init_ca(data_dir)
    files = tls_files(data_dir)
    print(f"CA created: {files.ca_cert} (key {files.ca_dir / 'ca.key'}, mode 0600)")
    print(f"CA fingerprint (sha256): {ca.fingerprint}")
    print(f"admin token (shown once; also in {files.admin_token}, mode 0600): {token}")
    return EXIT_OK


def _cmd_ca_issue_server(args: argparse.Namespace) -> int:
    from fedge.coordinator.identity import issue_server

    path = issue_server(_data_dir(args), hosts=args.host, ips=args.ip)
    print(f"server certificate: {path}")
    return EXIT_OK


def _cmd_token_create(args: argparse.Namespace) -> int:
    from fedge.coordinator.identity import create_token
    from fedge.store import Store

    if args.uses < 1:
        raise ConfigError(f"--uses must be at least 1, got {args.uses}")
    if args.device_id is not None:
        from fedge.pki import DEVICE_ID_PATTERN

        if not DEVICE_ID_PATTERN.fullmatch(args.device_id):
            raise ConfigError(f"--device-id {args.device_id!r} is not a valid device id")
    with Store(_data_dir(args)) as store:
        reply = create_token(store, expires_s=args.expires, uses=args.uses, device_id=args.device_id,
                             now=time.time())
    print(reply.token)
    bound = f" for device {reply.device_id}" if reply.device_id else ""
    print(f"(valid until {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(reply.expires_at))}, "
          f"{reply.uses} use(s){bound})", file=sys.stderr)
    return EXIT_OK


def _cmd_device_list(args: argparse.Namespace) -> int:
    from fedge.store import Store

    def when(t: float | None) -> str:
        return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))

    with Store(_data_dir(args)) as store:
        rows = store.devices()
    print(f"{'device':<24} {'enrolled':<17} {'last seen':<17} {'examples':>8}  {'status':<8}  training")
    for d in rows:
        status = "revoked" if d.revoked_at is not None else ("enrolled" if d.enrolled_at is not None else "-")
        # The agent's policy verdict at its last check-in: "ok", or why not.
        training = str(d.profile.get("policy", "-"))
        print(f"{d.device_id:<24} {when(d.enrolled_at):<17} {when(d.last_seen or None):<17} "
              f"{d.num_examples:>8}  {status:<8}  {training}")
    return EXIT_OK


def _cmd_device_status(args: argparse.Namespace) -> int:
    import json

    from fedge.agent.config import load_agent_config
    from fedge.agent.status import device_status, format_status

    status = device_status(load_agent_config(args.config, {}))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return EXIT_OK


def _cmd_device_revoke(args: argparse.Namespace) -> int:
    from fedge.store import Store

    with Store(_data_dir(args)) as store:
        try:
            count = store.revoke_device(args.device_id, now=time.time())
        except ValueError as e:
            raise ConfigError(str(e)) from None
    print(f"device {args.device_id} revoked ({count} certificate(s)); its next request is refused")
    return EXIT_OK


def _add_agent(sub: Any) -> None:
    p = sub.add_parser(
        "agent",
        help="run the device agent (trains on local data when invited)",
        description=(
            "Run the long-lived device agent: check in with the coordinator, wait as told, download "
            "the round's params, train on the local data file, upload the update. Network errors are "
            "retried with exponential backoff; SIGTERM stops it cleanly (exit 0). Settings come from "
            "--config agent.toml, then flags."
        ),
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", type=Path, metavar="FILE.toml", help="agent settings")
    p.add_argument("--coordinator", metavar="URL", help="the coordinator's base URL")
    p.add_argument("--data", metavar="FILE", help="local training data (.npz or .csv)")
    p.add_argument("--state-dir", metavar="DIR", help="where the agent keeps its identity and lock")
    p.add_argument("--device-id", metavar="ID", help="this device's id (default: generated once)")
    p.add_argument("--ca-cert", metavar="FILE", help="the fedge CA certificate to trust")
    p.add_argument("--ca-fingerprint", metavar="SHA256",
                   help="instead of --ca-cert: the CA's SHA-256 fingerprint (from `fedge ca init`)")
    p.add_argument("--token-file", metavar="FILE", help="the one-time enrolment token, in a file")
    p.add_argument("--token", metavar="TOKEN",
                   help="the enrolment token itself (visible in process listings: prefer --token-file)")
    p.add_argument("--insecure", action="store_true",
                   help="accept a plain http:// coordinator (no TLS, no authentication; warns)")
    _log_format_flag(p)
    p.set_defaults(func=_cmd_agent, log_level=logging.INFO)


def _agent_threads(config: Path | None) -> None:
    """Apply ``[limits] threads`` to BLAS and OpenMP before numpy loads (it reads them only then).

    The file is read here with tomllib alone; a bad file or value is left for
    the full config check that follows to report.
    """
    if config is None:
        return
    try:
        with config.open("rb") as f:
            threads = tomllib.load(f).get("limits", {}).get("threads")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(threads, int) and not isinstance(threads, bool) and 1 <= threads <= 1024:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(threads)


def _cmd_agent(args: argparse.Namespace) -> int:
    _agent_threads(getattr(args, "config", None))
    from fedge.agent import load_agent_config, run_agent

    keys = {"coordinator", "data", "state_dir", "device_id", "ca_cert", "ca_fingerprint", "token_file",
            "token", "insecure"}
    overrides = {k: v for k, v in vars(args).items() if k in keys}
    config = load_agent_config(getattr(args, "config", None), overrides)
    if not args.verbose:
        root = logging.getLogger()
        root.setLevel(config.log_level.upper())
        for handler in root.handlers:  # the console shows the configured level; events still see INFO
            handler.setLevel(config.log_level.upper())
    return run_agent(config)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run a real federation on this machine: a coordinator and agent processes",
        description=(
            "Start a coordinator and N agent processes on 127.0.0.1, each agent with its own "
            "Dirichlet(0.5) share of the digits in its own data file; train logistic regression with "
            "FedAvg, show progress, and write summary.json, metrics.jsonl, model.safetensors and every "
            "process's log to --out. Ctrl-C stops every process."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--agents", type=int, default=8, help="agent processes to start")
    p.add_argument("--rounds", type=int, default=20, help="rounds to train")
    p.add_argument("--seed", type=int, default=0, help="seed for the data split and the coordinator")
    p.add_argument("--secagg", action="store_true",
                   help="secure aggregation (SecAgg+): the coordinator sees only the sum of the agents' "
                   "updates (docs/secagg.md)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default: a new folder under runs/)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedge.demo import run_demo
    from fedge.sim.report import default_out_dir

    out_dir = args.out if args.out is not None else default_out_dir(Path("runs"), "demo")
    print("fedge demo: a new CA, a server certificate, a one-time token per agent; every agent enrols "
          "and then speaks mutual TLS", file=sys.stderr)
    print(f"fedge demo: {args.agents} agents, {args.rounds} rounds"
          f"{', secure aggregation (SecAgg+)' if args.secagg else ''}; logs in {out_dir}/logs/",
          file=sys.stderr)
    seen: set[tuple[int, int]] = set()

    def progress(status: dict[str, Any]) -> None:
        if args.quiet:
            return
        for h in status["history"]:
            key = (h["round"], h["attempt"])
            if key in seen:
                continue
            seen.add(key)
            acc = f"{h['accuracy']:.4f}" if "accuracy" in h else "-"
            secure = ""
            if "secagg_survivors" in h:  # dropouts by phase: advertise/share/upload/unmask
                dropped = "/".join(str(int(h.get(f"secagg_dropped_{p}", 0)))
                                   for p in ("advertise", "share", "upload", "unmask"))
                secure = f"  secagg dropped {dropped}"
            print(f"round {h['round']:>3}/{status['rounds']}  {h['state']:<9}  participants "
                  f"{h['reported']}/{h['invited']}  accuracy {acc}  {h['duration_s']:.2f} s{secure}",
                  file=sys.stderr)

    try:
        result = run_demo(agents=args.agents, rounds=args.rounds, out_dir=Path(out_dir), seed=args.seed,
                          secagg=args.secagg, progress=progress)
    except KeyboardInterrupt:
        print(f"fedge: interrupted; every process is stopped; logs are in {out_dir}/logs/", file=sys.stderr)
        return EXIT_INTERRUPTED
    s = result.summary
    overhead = s["timing"]["protocol_overhead_s_per_round"]
    print(f"final accuracy {s['accuracy']:.4f} after {s['rounds_complete']} rounds with "
          f"{s['devices']} agents, "
          f"{s['wall_s']:.1f} s (protocol overhead {overhead if overhead is not None else '-'} s per round)")
    print(f"model: {result.out_dir}/model.safetensors  metrics: {result.out_dir}/metrics.jsonl  "
          f"summary: {result.out_dir}/summary.json")
    return EXIT_OK


def _add_privacy(sub: Any) -> None:
    p = sub.add_parser(
        "privacy", help="privacy accounting: epsilon of a plan, noise for a target",
        description="Privacy accounting for DP-FedAvg rounds (Poisson-subsampled Gaussian), "
        "over Google's dp-accounting. See docs/privacy.md.",
    )
    psub = p.add_subparsers(dest="privacy_command", metavar="COMMAND")
    psub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--sample-rate", type=_fraction, required=True, metavar="Q",
                       help="probability that a device joins a round (1: no amplification)")
        q.add_argument("--rounds", type=int, required=True, metavar="T", help="number of rounds")
        q.add_argument("--delta", type=_fraction, required=True, metavar="D", help="target delta")
        q.add_argument("--accountant", choices=["rdp", "pld"], default="rdp", help="accountant (default rdp)")

    q = psub.add_parser("epsilon", help="epsilon after T rounds with noise multiplier Z",
                        description="Epsilon at delta D after T rounds, each a Gaussian mechanism with "
                        "noise multiplier Z on a Poisson sample of rate Q.")
    q.add_argument("--noise-multiplier", type=_fraction, required=True, metavar="Z",
                   help="noise stddev / clip norm")
    common(q)
    q.set_defaults(func=_cmd_privacy_epsilon)
    q = psub.add_parser("calibrate", help="the noise multiplier that reaches a target epsilon",
                        description="The smallest noise multiplier whose epsilon after T rounds at "
                        "delta D and sample rate Q is at most E.")
    q.add_argument("--target-epsilon", type=_fraction, required=True, metavar="E", help="target epsilon")
    common(q)
    q.set_defaults(func=_cmd_privacy_calibrate)


def _cmd_privacy_epsilon(args: argparse.Namespace) -> int:
    from fedge.privacy.accounting import epsilon_for

    eps = epsilon_for(noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate,
                      rounds=args.rounds, delta=args.delta, accountant=args.accountant)
    print(f"epsilon {eps:.6g} at delta {args.delta:g} after {args.rounds} rounds "
          f"(noise multiplier {args.noise_multiplier:g}, sample rate {args.sample_rate:g}, "
          f"{args.accountant})")
    return EXIT_OK


def _cmd_privacy_calibrate(args: argparse.Namespace) -> int:
    from fedge.privacy.accounting import calibrate_noise_multiplier, epsilon_for

    z = calibrate_noise_multiplier(target_epsilon=args.target_epsilon, sample_rate=args.sample_rate,
                                   rounds=args.rounds, delta=args.delta, accountant=args.accountant)
    eps = epsilon_for(noise_multiplier=z, sample_rate=args.sample_rate, rounds=args.rounds,
                      delta=args.delta, accountant=args.accountant)
    print(f"noise multiplier {z:.6g} (epsilon {eps:.6g} at delta {args.delta:g} after {args.rounds} "
          f"rounds, sample rate {args.sample_rate:g}, {args.accountant})")
    return EXIT_OK


def _add_bundle(sub: Any) -> None:
    p = sub.add_parser(
        "bundle",
        help="write an offline install bundle (wheelhouse + install script) for air-gapped devices",
        description=(
            "Write fedge's wheel and every dependency's wheel for the target platforms into "
            "--out/wheels, with pinned, hashed requirements per architecture and install.sh, so a "
            "device with no network installs with `sh install.sh` (pip install --no-index "
            "--require-hashes). Building the bundle needs the package index; installing it does not."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the bundle folder (new or empty)")
    p.add_argument("--platform", action="append", metavar="TAG", dest="platforms",
                   help="a wheel platform tag, e.g. manylinux_2_17_aarch64; repeat for several "
                   "(default: this machine's)")
    p.add_argument("--python", default="3.11", metavar="X.Y", help="the devices' Python version")
    p.add_argument("--extras", default="agent", metavar="LIST",
                   help="fedge extras to include, comma-separated (agent, coordinator, sim, torch, ray)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--source", type=Path, metavar="DIR", help="the fedge checkout to build from "
                   "(default: the one this fedge runs from)")
    g.add_argument("--wheel", type=Path, metavar="FILE", help="fedge's wheel, already built")
    p.set_defaults(func=_cmd_bundle)


def _cmd_bundle(args: argparse.Namespace) -> int:
    from fedge.bundle import build_bundle

    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    manifest = build_bundle(
        args.out, platforms=args.platforms, python=args.python, extras=extras, source=args.source,
        wheel=args.wheel, progress=lambda line: print(f"fedge bundle: {line}", file=sys.stderr),
    )
    print(f"bundle: {manifest.out_dir} (fedge {manifest.fedge_version}; install with "
          f"`sh {manifest.out_dir}/install.sh --prefix /opt/fedge`)")
    return EXIT_OK


def _add_events(sub: Any) -> None:
    p = sub.add_parser(
        "events", help="device events: policy skips, aborts, errors, enrolment, renewal",
        description=("List the events devices sent to the coordinator (newest last), from its data "
                     "directory. Works while the coordinator runs."),
    )
    _data_dir_args(p)
    p.add_argument("--device", metavar="ID", help="only this device's events")
    p.add_argument("--since", type=_duration, metavar="DURATION", help="only the last 30m, 1h, 7d...")
    p.add_argument("--limit", type=int, default=200, help="at most this many (the newest)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_cmd_events)


def _cmd_events(args: argparse.Namespace) -> int:
    import json

    from fedge.store import Store

    if not 1 <= args.limit <= 100_000:
        raise ConfigError(f"--limit must be between 1 and 100000, got {args.limit}")
    since = None if args.since is None else time.time() - args.since
    with Store(_data_dir(args)) as store:
        rows = store.events(device_id=args.device, since=since, limit=args.limit)
    for row in rows:
        if args.json:
            print(json.dumps(row.to_json()))
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.at))
        extra = "".join(f" {k}={v}" for k, v in row.fields.items() if k != "logger")
        print(f"{when}  {row.device_id:<20} {row.kind:<9} {row.level:<7} {row.message}{extra}")
    return EXIT_OK


def _add_rounds(sub: Any) -> None:
    p = sub.add_parser(
        "rounds", help="rounds and where their time went",
        description=("List every round attempt with its phases (selection, download, keys, training, "
                     "upload, decode, aggregation, unmask, evaluation, store), or, with `show N`, one "
                     "round's devices with their training throughput (and a secure round's dropouts by "
                     "phase). Reads the coordinator's data directory."),
    )
    _data_dir_args(p)
    p.add_argument("show", nargs="?", choices=["show"], help="show one round")
    p.add_argument("round", nargs="?", type=int, metavar="N", help="the round to show")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=_cmd_rounds)


def _cmd_rounds(args: argparse.Namespace) -> int:
    import json

    from fedge.store import PHASES, SECAGG_PHASES, Store

    if (args.show is None) != (args.round is None):
        raise ConfigError("give `fedge rounds` alone, or `fedge rounds show N`")
    with Store(_data_dir(args)) as store:
        rows = store.rounds()
        if args.round is None:
            table = [{"round": r.round, "attempt": r.attempt, "state": r.state, "invited": len(r.cohort),
                      "reported": len(r.reported),
                      "duration_s": None if r.closed_at is None else r.closed_at - r.opened_at,
                      "accuracy": r.metrics.get("accuracy"),
                      **{p: r.metrics.get(f"phase_{p}_s") for p in PHASES}} for r in rows]
            if args.json:
                print(json.dumps(table, indent=2))
                return EXIT_OK
            head = f"{'round':>5} {'att':>3} {'state':<11} {'rep/inv':>7} {'time s':>7} {'acc':>6}  " + \
                " ".join(f"{p[:8]:>8}" for p in PHASES)
            print(head)
            for t in table:
                cells = " ".join("       -" if t[p] is None else f"{t[p]:8.3f}" for p in PHASES)
                dur = "-" if t["duration_s"] is None else f"{t['duration_s']:.2f}"
                acc = "-" if t["accuracy"] is None else f"{t['accuracy']:.4f}"
                print(f"{t['round']:>5} {t['attempt']:>3} {t['state']:<11} "
                      f"{t['reported']:>3}/{t['invited']:<3} {dur:>7} {acc:>6}  {cells}")
            return EXIT_OK
        attempts = [r for r in rows if r.round == args.round]
        if not attempts:
            raise ConfigError(f"no round {args.round} in this store (it has {len({r.round for r in rows})})")
        out: list[dict[str, Any]] = []
        for r in attempts:
            epochs = r.metrics.get("local_epochs", 1.0)
            devices: list[dict[str, Any]] = []
            for u in store.updates(r.round, r.attempt):
                reported: dict[str, Any] = u["metrics"]  # type: ignore[assignment]
                took = reported.get("train_s")
                # 0: a secure round's masked vector, whose example count the coordinator never sees.
                n = int(str(u["num_examples"])) or None
                devices.append({"device": u["device_id"], "examples": n, "bytes": u["size_bytes"],
                                "train_s": took,
                                "examples_per_s": None if not took or n is None else n * epochs / took})
            out.append({"round": r.round, "attempt": r.attempt, "state": r.state,
                        "dropped": list(r.dropped), "metrics": r.metrics, "devices": devices})
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    for o in out:
        print(f"round {o['round']} attempt {o['attempt']}: {o['state']}; dropped: "
              f"{', '.join(o['dropped']) or 'none'}")
        m = o["metrics"]
        phases = [f"{p} {m[f'phase_{p}_s']:.3f} s" for p in PHASES if f"phase_{p}_s" in m]
        print("  phases: " + ("; ".join(phases) or "not recorded"))
        if "secagg_k" in m:
            dropped = ", ".join(f"{p} {int(m[f'secagg_dropped_{p}'])}" for p in SECAGG_PHASES
                                if f"secagg_dropped_{p}" in m)
            aborted = [p for p in SECAGG_PHASES if m.get(f"secagg_aborted_{p}")]
            print(f"  secure aggregation: k {int(m['secagg_k'])}, threshold {int(m['secagg_threshold'])}, "
                  f"{int(m['secagg_bits'])}-bit grid ({int(m['secagg_wire_bits'])} bits sent), "
                  f"{int(m['secagg_survivors'])} survivors; dropped by phase: {dropped or 'none recorded'}"
                  + (f"; abandoned in the {aborted[0]} phase, nothing unmasked" if aborted else ""))
        print(f"  {'device':<24} {'examples':>8} {'bytes':>9} {'train s':>8} {'examples/s':>11}")
        for d in o["devices"]:
            took = "-" if d["train_s"] is None else f"{d['train_s']:.3f}"
            rate = "-" if d["examples_per_s"] is None else f"{d['examples_per_s']:.0f}"
            examples = "masked" if d["examples"] is None else d["examples"]
            print(f"  {d['device']:<24} {examples:>8} {d['bytes']:>9} {took:>8} {rate:>11}")
    return EXIT_OK


def _add_backup(sub: Any) -> None:
    p = sub.add_parser(
        "backup",
        help="copy a coordinator's data directory while it runs",
        description=("Write a consistent copy of the coordinator's store (SQLite online backup), its "
                     "checkpoints, CA, server certificate and admin token to a new folder. The copy is a "
                     "data directory: to restore, stop the coordinator and put it in place of the old one."),
    )
    _data_dir_args(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the new backup folder")
    p.set_defaults(func=_cmd_backup)


def _cmd_backup(args: argparse.Namespace) -> int:
    from fedge.backup import backup_data_dir

    counts = backup_data_dir(Path(_data_dir(args)), args.out)
    print(f"backup: {args.out} (store, {counts['checkpoints']} checkpoints, "
          f"{counts['files']} identity files)")
    return EXIT_OK


def _add_data(sub: Any) -> None:
    d = sub.add_parser("data", help="prepare device data files",
                       description="Prepare data for rehearsals: split a data set into per-device files.")
    d_sub = d.add_subparsers(dest="data_command", metavar="COMMAND")
    d_sub.required = True
    p = d_sub.add_parser(
        "split", help="write one .npz file per device, and test.npz",
        description=("Partition a data set over devices as the simulator does and write device-0.npz, "
                     "device-1.npz, ... and test.npz (arrays x and y) to --out: one agent's local data "
                     "each, and the coordinator's evaluation data."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default="digits", help="digits, synthetic:ALPHA,BETA, or a .npz/.csv file")
    p.add_argument("--partition", default="dirichlet:0.5",
                   help="iid, dirichlet:ALPHA, shards:K or powerlaw:A")
    p.add_argument("--devices", type=int, required=True, help="number of device files")
    p.add_argument("--seed", type=int, default=0, help="seed of the partition")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=_cmd_data_split)


def _cmd_data_split(args: argparse.Namespace) -> int:
    from fedge.data.export import write_split

    if args.devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {args.devices}")
    paths, test = write_split(args.out, data=args.data, partition=args.partition, devices=args.devices,
                              seed=args.seed)
    print(f"wrote {len(paths)} device files and {test.name} to {args.out}")
    return EXIT_OK


def _add_healthcheck(sub: Any) -> None:
    p = sub.add_parser(
        "healthcheck",
        help="exit 0 if the local coordinator or agent is alive (for container healthchecks)",
        description=(
            "Probe a service on this machine. coordinator: GET /healthz on its own port over "
            "loopback (TLS verified against the CA in its data directory). agent: check that an "
            "agent holds the lock on its state directory. Exit 0 when healthy, 1 when not."
        ),
    )
    hc = p.add_subparsers(dest="target", metavar="TARGET")
    hc.required = True
    c = hc.add_parser("coordinator", help="probe the coordinator", argument_default=argparse.SUPPRESS)
    c.add_argument("--config", type=Path, metavar="FILE.toml", help="the coordinator's settings")
    c.add_argument("--port", type=int, help="its port (default: from the config)")
    c.add_argument("--data-dir", help="its data directory (default: from the config)")
    c.add_argument("--insecure", action="store_true", help="it serves plain HTTP")
    c.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    c.set_defaults(func=_cmd_healthcheck)
    a = hc.add_parser("agent", help="probe the agent", argument_default=argparse.SUPPRESS)
    a.add_argument("--config", type=Path, metavar="FILE.toml", help="the agent's settings")
    a.add_argument("--state-dir", metavar="DIR", help="its state directory (default: from the config)")
    a.set_defaults(func=_cmd_healthcheck)


def _cmd_healthcheck(args: argparse.Namespace) -> int:
    from fedge.healthcheck import check_agent, check_coordinator

    if args.target == "agent":
        if "state_dir" in args:
            state_dir = Path(args.state_dir)
        elif "config" in args:
            from fedge.agent.config import load_agent_config

            state_dir = Path(load_agent_config(args.config, {}).state_dir)
        else:
            raise ConfigError("fedge healthcheck agent: give --state-dir DIR or --config FILE.toml")
        healthy, why = check_agent(state_dir)
    else:
        from fedge.coordinator.config import load_coordinator_config
        from fedge.coordinator.identity import tls_files

        given = {k: v for k, v in vars(args).items() if k in {"port", "data_dir", "insecure"}}
        if "config" in args:
            config = load_coordinator_config(args.config, given)
            host, port, insecure, data_dir = config.host, config.port, config.insecure, config.data_dir
        elif "port" in given:
            host, port = "127.0.0.1", int(given["port"])
            insecure, data_dir = bool(given.get("insecure", False)), str(given.get("data_dir", "fedge-data"))
        else:
            raise ConfigError("fedge healthcheck coordinator: give --config FILE.toml or --port PORT")
        healthy, why = check_coordinator(host=host, port=port, insecure=insecure,
                                         ca_file=tls_files(data_dir).ca_cert, timeout_s=args.timeout)
    print(f"fedge healthcheck: {'healthy' if healthy else 'unhealthy'}: {why}",
          file=sys.stdout if healthy else sys.stderr)
    return EXIT_OK if healthy else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedge",
        description="Privacy-preserving federated learning for fleets of Linux edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"fedge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--log-format", choices=("console", "json"),
                        default=os.environ.get("FEDGE_LOG_FORMAT", "console"),
                        help="console lines, or one JSON object per line for journald, Fluentd and "
                        "rsyslog (default: $FEDGE_LOG_FORMAT, else console)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_simulate(sub)
    _add_coordinator(sub)
    _add_agent(sub)
    _add_demo(sub)
    _add_admin(sub)
    _add_privacy(sub)
    _add_bundle(sub)
    _add_healthcheck(sub)
    _add_data(sub)
    _add_backup(sub)
    _add_events(sub)
    _add_rounds(sub)
    _add_lab(sub)
    return parser


def _add_lab(sub: Any) -> None:
    lab = sub.add_parser(
        "lab", help="rehearse a real edge fleet on this machine (namespaces, shaped links, arm64, faults)",
        description=(
            "Run a real coordinator and real agents (from the offline bundle, in Podman containers, amd64 or "
            "emulated arm64) with CPU and memory limits, each device in its own network namespace behind a "
            "shaped, lossy link, through a fault schedule; then report and tear everything down. Needs root "
            "(docs/lab.md)."
        ),
    )
    lsub = lab.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)
    p = lsub.add_parser(
        "run", help="bring a lab up from SPEC.toml, run its federation and faults, report, tear down",
        description=(
            "Build (or reuse) the agent images, create the lab's bridge, namespaces, links and disks, start "
            "the coordinator and the agents, fire the spec's faults, and write report.json and report.html "
            "to --out. Ctrl-C, SIGTERM and `fedge lab down` tear everything down."
        ),
    )
    p.add_argument("spec", type=Path, metavar="SPEC.toml", help="the lab spec (docs/lab.md)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default: a new folder under runs/)")
    p.add_argument("--no-compare", action="store_true",
                   help="skip the plain simulation of the same partitions that the report compares with")
    p.set_defaults(func=_cmd_lab_run, log_level=logging.INFO)
    p = lsub.add_parser("status", help="the labs that are up, and how far their runs are")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_cmd_lab_status)
    p = lsub.add_parser("down", help="stop a lab's run and remove everything it made",
                        description="Stop the run (if one is going) and remove every namespace, link, qdisc, "
                        "firewall rule, disk, container and process its state file lists.")
    p.add_argument("name", nargs="?", help="the lab's name (default: every lab that is up)")
    p.set_defaults(func=_cmd_lab_down)
    p = lsub.add_parser("check",
                        help="what the lab needs on this machine: present, and missing with its package")
    p.add_argument("spec", type=Path, nargs="?", metavar="SPEC.toml",
                   help="check only what this spec needs (its architectures)")
    p.set_defaults(func=_cmd_lab_check)


def _cmd_lab_run(args: argparse.Namespace) -> int:
    from fedge.lab.runner import run_lab
    from fedge.lab.spec import load_spec
    from fedge.sim.report import default_out_dir

    spec = load_spec(args.spec)
    out_dir = args.out if args.out is not None else default_out_dir(Path("runs"), f"lab-{spec.lab.name}")

    def progress(line: str) -> None:
        print(f"lab {spec.lab.name}: {line}", file=sys.stderr, flush=True)

    report = run_lab(spec, out_dir=Path(out_dir), progress=progress, compare=not args.no_compare)
    c = report["comparison"]
    lab_acc = "-" if c["lab_accuracy"] is None else f"{c['lab_accuracy']:.4f}"
    sim_acc = "-" if c["simulated_accuracy"] is None else f"{c['simulated_accuracy']:.4f}"
    complete = sum(1 for r in report["rounds"] if r["state"] == "complete")
    left = report["lab"]["leftovers"]
    print(f"lab {spec.lab.name}: {complete} rounds complete, accuracy {lab_acc} "
          f"(plain simulation {sim_acc}), {report['lab']['wall_s']:.0f} s; "
          + (f"left behind: {', '.join(left)}" if left else "nothing left behind"))
    print(f"report: {out_dir}/report.html  {out_dir}/report.json")
    return EXIT_OK if report["lab"]["ok"] else EXIT_FAILED


def _cmd_lab_status(args: argparse.Namespace) -> int:
    from fedge.lab.control import format_status, lab_status

    labs = lab_status()
    print(json.dumps(labs, indent=2) if args.json else format_status(labs))
    return EXIT_OK


def _cmd_lab_down(args: argparse.Namespace) -> int:
    from fedge.lab.control import lab_down

    failures = lab_down(args.name, progress=lambda line: print(line, file=sys.stderr))
    for failure in failures:
        print(f"fedge: {failure}", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK


def _cmd_lab_check(args: argparse.Namespace) -> int:
    from fedge.lab.prereqs import check, format_report

    arches = {"amd64", "arm64"}
    if args.spec is not None:
        from fedge.lab.spec import load_spec

        arches = set(load_spec(args.spec).arches)
    prereqs = check(arches=arches)
    print(format_report(prereqs))
    return EXIT_OK if all(p.ok for p in prereqs) else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedge`` console script; returns the exit status."""
    started_at = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.started_at = started_at
    # As ``python -m`` does, let ``--task mymodule:attr`` find mymodule.py in
    # the working directory; appended, so it never shadows an installed package.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    # Services log what they do (INFO, with time and origin); one-shot
    # commands only warn.
    service = getattr(args, "log_level", logging.WARNING) < logging.WARNING
    from fedge.logs import FORMATS, configure

    if args.log_format not in FORMATS:  # only $FEDGE_LOG_FORMAT can bring one (argparse checks the flag)
        print(f"fedge: error: FEDGE_LOG_FORMAT must be one of {', '.join(FORMATS)}, got "
              f"{args.log_format!r}", file=sys.stderr)
        return EXIT_USAGE
    configure(fmt=args.log_format, service=service,
              level=logging.DEBUG if args.verbose else getattr(args, "log_level", logging.WARNING))
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"fedge: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FedgeError as e:
        print(f"fedge: failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("fedge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``fedge simulate | head -1``): not an error of
        # ours. Point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
