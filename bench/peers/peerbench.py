#!/usr/bin/env python3
"""The peer benchmark: tidepool against HAProxy, Envoy and nginx, side by side.

Every path runs in one process tree at once on loopback, with grpc-go's
helloworld greeter (unary SayHello) and route_guide (server-streaming
ListFeatures) as backends and ghz (one client connection) as the load.
Repetitions are interleaved: for each repetition, each scenario runs every
path in turn. Per path it reports RPS, p50/p99 latency, the proxy's CPU
seconds per 1000 RPCs (utime + stime from /proc, the proxy's whole process
tree), and the backend connections the proxy opened during the run (its
sockets to the backend port, sampled with `ss`). Ratios against HAProxy and
Envoy are taken within each repetition. It measures and reports; it asserts
nothing about time.

Usage: peerbench.py --agent PATH --peers DIR [--reps 3] [--seconds 5]
                    [--variant NAME=PATH ...] [--json OUT]
(--variant adds another tidepool-agent binary, say a build with other
profile settings, as one more path with default threads.)
(`make bench-peers` passes the paths.)
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TICK = os.sysconf("SC_CLK_TCK")

# Ports below the ephemeral range (32768-60999 on Linux by default), so a
# client socket can never hold one.
GREETER, ROUTEGUIDE = 20051, 20052
PATHS = {
    # name: (unary port, streaming port)
    "direct": (GREETER, ROUTEGUIDE),
    "tidepool": (20101, 20102),
    "tidepool-1w": (20111, 20112),
    "haproxy": (20121, 20122),
    "envoy": (20131, 20132),
    "nginx": (20141, 20142),
}
RECT = ('{"lo":{"latitude":400000000,"longitude":-750000000},'
        '"hi":{"latitude":420000000,"longitude":-730000000}}')
SCENARIOS = [
    # name, call, data, streams, backend port
    ("unary x1", "helloworld.Greeter.SayHello", '{"name":"tidepool"}', 1, GREETER),
    ("unary x16", "helloworld.Greeter.SayHello", '{"name":"tidepool"}', 16, GREETER),
    ("unary x64", "helloworld.Greeter.SayHello", '{"name":"tidepool"}', 64, GREETER),
    ("server-streaming x16", "routeguide.RouteGuide.ListFeatures", RECT, 16, ROUTEGUIDE),
]


def fill(template, values):
    with open(os.path.join(HERE, template)) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def wait_listening(port, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"peerbench: {what} did not listen on 127.0.0.1:{port} within {timeout}s")


def tree(pid):
    """pid and its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except OSError:
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICK


def backend_sockets(backend_port, pids):
    """Local ports of the sockets `pids` hold to the backend port."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( dport = :{backend_port} )"],
        capture_output=True, text=True).stdout
    ports = set()
    wanted = {str(p) for p in pids}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        owners = set(re.findall(r"pid=(\d+)", line))
        if owners & wanted:
            ports.add(cols[2].rsplit(":", 1)[1])
    return ports


class Sampler(threading.Thread):
    """Collects the backend sockets a proxy holds while a run lasts."""

    def __init__(self, backend_port, pids):
        super().__init__(daemon=True)
        self.backend_port, self.pids = backend_port, pids
        self.before = backend_sockets(backend_port, pids)
        self.seen = set(self.before)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.1):
            self.seen |= backend_sockets(self.backend_port, self.pids)

    def finish(self):
        """(connections held during the run, of which opened during it)."""
        self.stop.set()
        self.join()
        return len(self.seen), len(self.seen - self.before)


def ghz(peers, call, data, streams, port, seconds=None, calls=None):
    args = [os.path.join(peers, "ghz"), "--insecure", "--connections", "1", "-O", "json",
            "--protoset", os.path.join(peers, "peers.protoset"), "--call", call, "-d", data,
            "-c", str(streams)]
    args += ["-z", f"{seconds}s"] if seconds else ["-n", str(calls)]
    done = subprocess.run(args + [f"127.0.0.1:{port}"], capture_output=True, text=True)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        sys.exit(f"peerbench: ghz printed no report: {done.stderr.strip()}")
    lat = {int(p["percentage"]): p["latency"] / 1e6 for p in report.get("latencyDistribution") or []}
    codes = report.get("statusCodeDistribution") or {}
    return {
        "rps": report["rps"],
        "count": report["count"],
        "ok": codes.get("OK", 0),
        # ghz's -z cancels the calls in flight when it stops: not failures.
        "failed": sum(n for code, n in codes.items() if code not in ("OK", "Canceled")),
        "codes": codes,
        "p50": lat.get(50),
        "p99": lat.get(99),
    }


class Bench:
    def __init__(self, args):
        self.args = args
        self.variants = []
        for i, variant in enumerate(args.variant or []):
            name, _, path = variant.partition("=")
            if not path or not os.access(path, os.X_OK):
                sys.exit(f"peerbench: --variant {variant!r}: want NAME=PATH to an executable agent")
            name = f"tidepool-{name}"
            PATHS[name] = (20151 + 10 * i, 20152 + 10 * i)
            self.variants.append((name, path))
        self.dir = tempfile.mkdtemp(prefix="tidepool-peerbench-")
        self.procs = {}
        self.tools = dict(line.split("=", 1) for line in subprocess.run(
            [os.path.join(HERE, "install.sh")], check=True, capture_output=True,
            text=True).stdout.split())

    def spawn(self, name, argv, ports):
        log = open(os.path.join(self.dir, f"{name}.log"), "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        self.procs[name] = proc
        for port in ports:
            wait_listening(port, name)
        return proc

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def start(self):
        peers = self.args.peers
        self.spawn("greeter", [os.path.join(peers, "greeter-server"), "-port", str(GREETER)], [GREETER])
        self.spawn("routeguide", [os.path.join(peers, "route-guide-server"), "-port", str(ROUTEGUIDE)],
                   [ROUTEGUIDE])
        agents = [("tidepool", self.args.agent, None), ("tidepool-1w", self.args.agent, 1)]
        agents += [(name, path, None) for name, path in self.variants]
        for name, binary, workers in agents:
            unary, stream = PATHS[name]
            pools = self.write(f"{name}.yaml", fill("tidepool.yaml", {
                "GREETER": GREETER, "ROUTEGUIDE": ROUTEGUIDE,
                "UNARY_PORT": unary, "STREAM_PORT": stream}))
            argv = [binary, "--standalone", pools,
                    "--listen", f"127.0.0.1:{unary - 1}", "--admin-listen", f"127.0.0.1:{unary + 2}"]
            if workers:
                argv += ["--worker-threads", str(workers)]
            os.environ["TIDEPOOL_LOG"] = "warn"
            self.spawn(name, argv, [unary, stream])
        values = {"GREETER": GREETER, "ROUTEGUIDE": ROUTEGUIDE, "DIR": self.dir}
        unary, stream = PATHS["haproxy"]
        cfg = self.write("haproxy.cfg", fill("haproxy.cfg", dict(values, UNARY_PORT=unary, STREAM_PORT=stream)))
        self.spawn("haproxy", [self.tools["haproxy"], "-f", cfg, "-db"], [unary, stream])
        unary, stream = PATHS["envoy"]
        cfg = self.write("envoy.yaml", fill("envoy.yaml", dict(values, UNARY_PORT=unary, STREAM_PORT=stream)))
        self.spawn("envoy", [self.tools["envoy"], "-c", cfg, "--concurrency", "1", "-l", "warning",
                             "--base-id", str(os.getpid() % 60000)], [unary, stream])
        unary, stream = PATHS["nginx"]
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        cfg = self.write("nginx.conf", fill("nginx.conf", dict(values, UNARY_PORT=unary, STREAM_PORT=stream)))
        self.spawn("nginx", [self.tools["nginx"], "-c", cfg, "-p", self.dir, "-e",
                             os.path.join(self.dir, "nginx-error.log")], [unary, stream])
        # A run counts only once each path answers: a few calls each, then
        # a warm-up.
        for name, (unary, stream) in PATHS.items():
            for _, call, data, _, backend in SCENARIOS[:1] + SCENARIOS[-1:]:
                port = unary if backend == GREETER else stream
                check = ghz(peers, call, data, 1, port, calls=20)
                if check["ok"] != 20:
                    sys.exit(f"peerbench: {name} does not serve {call}: {check['codes']}")
                ghz(peers, call, data, 16, port, calls=2000)

    def stop(self):
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self):
        results = []  # (rep, scenario, path, figures)
        for rep in range(1, self.args.reps + 1):
            for scenario, call, data, streams, backend in SCENARIOS:
                for name, (unary, stream) in PATHS.items():
                    port = unary if backend == GREETER else stream
                    proc = self.procs.get(name)
                    pids = tree(proc.pid) if proc else []
                    sampler = Sampler(backend, pids) if proc else None
                    if sampler:
                        sampler.start()
                    cpu0 = cpu_seconds(pids)
                    figures = ghz(self.args.peers, call, data, streams, port, seconds=self.args.seconds)
                    figures["cpu"] = cpu_seconds(pids) - cpu0 if proc else None
                    figures["held"], figures["opened"] = sampler.finish() if sampler else (None, None)
                    figures["load"] = os.getloadavg()[0]
                    results.append((rep, scenario, name, figures))
                    print(f"  rep {rep} {scenario:22} {name:12} {figures['rps']:9.0f} RPS"
                          f"  ok {figures['ok']}/{figures['count']}  load {figures['load']:.1f}",
                          file=sys.stderr)
        return results


def span(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def report(results, reps, seconds):
    def cpu_per_1000(f):
        return None if f["cpu"] is None or not f["ok"] else f["cpu"] / f["ok"] * 1000

    by = {}
    for rep, scenario, path, f in results:
        by.setdefault(scenario, {}).setdefault(path, {})[rep] = f
    loads = [f["load"] for *_, f in results]
    lines = [f"Peer benchmark: {reps} interleaved repetitions of {seconds} s per path; "
             f"load average {min(loads):.1f}–{max(loads):.1f} during the runs. "
             "Ranges are min–max over the repetitions; `failed` leaves out the calls ghz "
             "cancels when it stops.", ""]
    for scenario, paths in by.items():
        lines.append(f"### {scenario}")
        lines.append("")
        lines.append("| path | RPS | RPS ÷ direct | p50 ms | p99 ms | CPU s / 1000 RPC | backend conns used (opened in the run) | failed |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        direct = paths["direct"]
        for path, per_rep in paths.items():
            fs = list(per_rep.values())
            ratio = [per_rep[r]["rps"] / direct[r]["rps"] for r in per_rep if r in direct]
            lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
                path, span([f["rps"] for f in fs], "{:.0f}"), span(ratio, "{:.2f}"),
                span([f["p50"] for f in fs], "{:.2f}"), span([f["p99"] for f in fs], "{:.2f}"),
                span([cpu_per_1000(f) for f in fs], "{:.4f}"),
                "{} ({})".format(span([f["held"] for f in fs], "{:.0f}"), span([f["opened"] for f in fs], "{:.0f}")),
                span([f["failed"] for f in fs], "{:.0f}")))
        lines.append("")
        for ours in [p for p in paths if p.startswith("tidepool")]:
            for peer in ("haproxy", "envoy"):
                cpu = [cpu_per_1000(paths[ours][r]) / cpu_per_1000(paths[peer][r])
                       for r in paths[ours] if cpu_per_1000(paths[ours][r]) and cpu_per_1000(paths[peer][r])]
                rps = [paths[ours][r]["rps"] / paths[peer][r]["rps"] for r in paths[ours]]
                # p99 added over direct, ours minus the peer's, in ms: a
                # ratio of two small differences is noise.
                p99 = [(paths[ours][r]["p99"] - direct[r]["p99"]) - (paths[peer][r]["p99"] - direct[r]["p99"])
                       for r in paths[ours] if paths[ours][r]["p99"] and paths[peer][r]["p99"]]
                lines.append(f"- {ours} ÷ {peer}, same repetition: CPU per RPC {span(cpu, '{:.2f}')}×, "
                             f"RPS {span(rps, '{:.2f}')}×, p99 added over direct {span(p99, '{:+.2f}')} ms against the peer's")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agent", required=True, help="the tidepool-agent binary (release)")
    parser.add_argument("--peers", required=True, help="the folder tests/peers/build.sh prints")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--variant", action="append", help="NAME=PATH of another agent binary")
    parser.add_argument("--json", help="also write every figure here")
    args = parser.parse_args()
    bench = Bench(args)
    try:
        bench.start()
        versions = {
            "haproxy": subprocess.run([bench.tools["haproxy"], "-v"], capture_output=True, text=True).stdout.split("\n")[0],
            "nginx": subprocess.run([bench.tools["nginx"], "-v"], capture_output=True, text=True).stderr.strip(),
            "envoy": subprocess.run([bench.tools["envoy"], "--version"], capture_output=True, text=True).stdout.strip().split("\n")[-1][:80],
        }
        results = bench.run()
    finally:
        bench.stop()
    print(report(results, args.reps, args.seconds))
    print("Peers: " + "; ".join(f"{k}: {v}" for k, v in versions.items()))
    print(f"Machine: {os.cpu_count()} CPUs, {os.uname().release}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "versions": versions}, f, indent=1)


if __name__ == "__main__":
    main()
