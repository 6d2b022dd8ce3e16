#!/usr/bin/env python3
"""Write shim/hot-symbols.txt: the functions (and named constants) a running shim uses, in the
order shim/link-hot-first.sh puts them at the front of the static shim.

A developer's tool, run as root on a machine where `make test` has passed (it reuses its e2e
build), after changes that move much of the shim's code: a new dependency or toolchain. Names
in the list that no longer exist are skipped, so a stale list costs memory, never correctness;
`make bench` shows the effect (bench_shim's VmRSS). About 25 minutes, most of it one
instrumented build of the shim:

  1. Which functions run, exactly: the shim built with sanitizer coverage (one guard per
     function; cov.c records the first call of each) runs the training workload. This sees
     Rust code only: glibc and the precompiled part of std are not instrumented, and inlining
     differs a little from the real build.
  2. The rest, by page: the real static shim, linked with the list so far, runs from a
     loop-mounted ext4 whose readahead is 0, so a page of the binary is in the page cache only
     if some process touched it (fault-around maps only cached pages, it never reads them;
     `pages` asks mincore). Every symbol on a touched page that step 1 did not prove cold
     joins the list. Repeated: each round's layout shows what the last one missed.

The training workload is what bench_shim and crispd's end-to-end tests drive: containerd's
bench (pods of one and two containers, 20 s idle, their teardown) and crispd's lifecycle and
exec/stats tests (the release crispd, this shim beside it).
"""
import argparse
import bisect
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHIM = "containerd-shim-crisp-v2"
TRIPLE = "x86_64-unknown-linux-gnu"
HASH = re.compile(r"17h[0-9a-f]{16}E$")
STATIC = ["-C", "target-feature=+crt-static", "-C", "relocation-model=static"]
SANCOV = ["-Cpasses=sancov-module", "-Cllvm-args=-sanitizer-coverage-level=1",
          "-Cllvm-args=-sanitizer-coverage-trace-pc-guard"]
# nm types of code and read-only data: what lies in the binary's read-only, file-backed pages.
FILE_BACKED = set("tTWiRr")
HEADER = """\
# The static shim's hot symbols, in link order (shim/link-hot-first.sh): written by
# hack/shim-hot-symbols/make-list.py, which says how. Rust names are kept without their hash.
"""


def run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def key(name):
    return HASH.sub("", name)


def symbols(binary):
    """(address, size, nm type, name) of each defined symbol, by address."""
    out = run(["nm", "-n", "-S", "--defined-only", binary], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        p = line.split()
        if len(p) == 4:
            rows.append((int(p[0], 16), int(p[1], 16), p[2], p[3]))
    return rows


def file_page(binary):
    """A function from a virtual address to the index of the file page that holds it."""
    out = run(["readelf", "-lW", binary], capture_output=True, text=True).stdout
    segs = [(int(p[1], 16), int(p[2], 16), int(p[4], 16))
            for p in (line.split() for line in out.splitlines()) if p and p[0] == "LOAD"]

    def page(va):
        for off, start, size in segs:
            if start <= va < start + size:
                return (off + va - start) // 4096
        return None
    return page


class Trainer:
    """Runs the training workload against a shim placed in `dir` beside a release crispd."""

    def __init__(self, dir, pages_tool):
        self.dir, self.pages_tool = Path(dir), pages_tool

    def place(self, shim):
        shutil.copy2(ROOT / "target/release/crispd", self.dir / "crispd")
        shutil.copy2(shim, self.dir / SHIM)

    def crispd_tests(self):
        env = dict(os.environ, CRISP_BIN=str(self.dir / "crispd"))
        run(["cargo", "nextest", "run", "--workspace", "-E",
             "binary(lifecycle) | binary(crispd_exec_stats)"], env=env, cwd=ROOT,
            stdout=subprocess.DEVNULL)

    def containerd_bench(self, while_running=None):
        # The hold keeps the pods 20 s after they start: a shim spends its life idle, and its
        # idle paths (timers, a blocking-pool thread that exits) are part of what it maps.
        env = dict(os.environ, CRISP_SHIM_DIR=str(self.dir), CRISP_BENCH_HOLD="20")
        env.pop("CRISP_SHIM_DYNAMIC", None)
        cmd = ["cargo", "nextest", "run", "--workspace", "--run-ignored", "only", "-E",
               "test(bench_shim_rss_and_pod_start)"]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        if while_running:
            while_running(proc)
        if proc.wait() != 0:
            sys.exit(f"make-list: {' '.join(cmd)} failed")

    def cached(self):
        out = run([self.pages_tool, self.dir / SHIM], capture_output=True, text=True).stdout
        return {int(line) for line in out.split()}


class LoopMount:
    """An ext4 on a loop device with readahead 0: only touched pages enter the page cache."""

    def __init__(self, tmp):
        self.img, self.mnt = Path(tmp) / "loop.img", Path(tmp) / "mnt"

    def __enter__(self):
        with open(self.img, "wb") as f:
            f.truncate(400 << 20)
        run(["mkfs.ext4", "-q", "-F", self.img])
        self.dev = run(["losetup", "-f", "--show", self.img], capture_output=True,
                       text=True).stdout.strip()
        self.mnt.mkdir()
        self.mount()
        return self

    def mount(self):
        run(["mount", self.dev, self.mnt])
        Path(f"/sys/block/{Path(self.dev).name}/queue/read_ahead_kb").write_text("0")
        os.chmod(self.mnt, 0o711)

    def remount(self):
        """Empties the page cache of every file on it."""
        run(["umount", self.mnt])
        self.mount()

    def __exit__(self, *exc):
        subprocess.run(["umount", str(self.mnt)])
        subprocess.run(["losetup", "-d", self.dev])


def drop_after_whole_read(path, pages_tool, proc):
    """bench_shim reads the shim whole (its ELF check) before any shim runs: drop those pages
    from the cache once that read is done, so what stays cached is what shims touch."""
    whole = os.path.getsize(path) // 4096 * 9 // 10
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        out = subprocess.run([pages_tool, path], capture_output=True, text=True).stdout
        if out.count("\n") >= whole:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            return
        time.sleep(0.02)
    sys.exit("make-list: bench_shim never read the shim whole; cannot tell its pages apart")


def instrumented_run(trainer, target_dir):
    """Step 1: the Rust functions that ran (by first call) and those that provably did not."""
    # Fixed paths: cargo does not see cov.o's content, only the flag naming it.
    Path(target_dir).mkdir(parents=True, exist_ok=True)
    cov_o, pcs = Path(target_dir) / "cov.o", Path(target_dir) / "pcs"
    run(["cc", "-O2", "-c", f'-DSHIM_COV_FILE="{pcs}"', HERE / "cov.c", "-o", cov_o])
    pcs.unlink(missing_ok=True)
    env = dict(os.environ, CARGO_TARGET_DIR=str(target_dir), RUSTFLAGS=" ".join(STATIC + SANCOV))
    run(["cargo", "rustc", "--profile", "shim", "--target", TRIPLE, "-p", "crisp-shim", "--bin",
         SHIM, "--", f"-Clink-arg={cov_o}"], env=env, cwd=ROOT)
    binary = Path(target_dir) / TRIPLE / "shim" / SHIM
    trainer.place(binary)
    trainer.crispd_tests()
    trainer.containerd_bench()
    rows = [r for r in symbols(binary) if r[2] in "tTW"]
    addrs = [r[0] for r in rows]
    ran, seen = [], set()
    data = pcs.read_bytes()
    for (pc,) in struct.iter_unpack("<Q", data[: len(data) // 8 * 8]):
        i = bisect.bisect_right(addrs, pc - 1) - 1
        if i >= 0 and key(rows[i][3]) not in seen:
            seen.add(key(rows[i][3]))
            ran.append(key(rows[i][3]))
    instrumented, current = set(), None
    dis = run(["objdump", "-d", "--no-show-raw-insn", binary], capture_output=True, text=True).stdout
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            current = key(m.group(1))
        elif current and "<__sanitizer_cov_trace_pc_guard>" in line:
            instrumented.add(current)
    print(f"make-list: {len(ran)} functions ran of {len(instrumented)} instrumented",
          file=sys.stderr)
    return ran, instrumented - seen


def link(hot, out):
    """The real static shim, linked as `make release` links it, with `hot` as its order."""
    out.write_text(HEADER + "\n".join(hot) + "\n")
    run(["cargo", "rustc", "--profile", "shim", "-p", "crisp-shim", "--bin", SHIM, "--"] + STATIC
        + ["-C", f"linker={ROOT / 'shim/link-hot-first.sh'}"], cwd=ROOT)
    return ROOT / "target/shim" / SHIM


def touched_keys(binary, pages):
    """Each symbol key of the file-backed segments: whether any of its pages was touched, and
    the keys in address order."""
    page = file_page(binary)
    rows = symbols(binary)
    touched, order = {}, []
    for i, (addr, size, kind, name) in enumerate(rows):
        if kind not in FILE_BACKED:
            continue
        if size == 0:  # assembly without a size: up to the next symbol
            size = max(1, min((rows[i + 1][0] - addr) if i + 1 < len(rows) else 1, 1 << 16))
        first, last = page(addr), page(addr + size - 1)
        if first is None or last is None:
            continue
        k = key(name)
        hit = any(p in pages for p in range(first, last + 1))
        if k not in touched:
            order.append(k)
        touched[k] = touched.get(k, False) or hit
    return touched, order


def page_round(trainer, loop, hot, cold, out):
    binary = link(hot, out)
    trainer.place(binary)
    loop.remount()
    trainer.crispd_tests()
    pages = trainer.cached()
    loop.remount()
    trainer.containerd_bench(
        lambda proc: drop_after_whole_read(trainer.dir / SHIM, trainer.pages_tool, proc))
    pages |= trainer.cached()
    touched, order = touched_keys(binary, pages)
    # Only names gone from the binary leave the list. An entry on a page no process touched
    # stays: what a shim runs varies from run to run (timers, the blocking pool's threads,
    # when a process exits), and a first run that pruned such entries measured 3317 KiB
    # VmRSS per shim against 2992 for the union of the rounds.
    keep = [k for k in hot if k in touched]
    have = set(keep)
    add = [k for k in order if touched[k] and k not in have and k not in cold]
    print(f"make-list: {len(pages)} pages touched; list {len(hot)} -> kept {len(keep)}, "
          f"added {len(add)}", file=sys.stderr)
    return keep + add


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="page rounds after the first step")
    ap.add_argument("--target-dir", default=str(ROOT / "target/shim-hot-symbols"),
                    help="cargo target dir of the instrumented build (kept for the next run)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("make-list: needs root (loop device, mount, containerd)")
    out = ROOT / "shim/hot-symbols.txt"
    run(["cargo", "build", "--release", "-p", "crisp-cri", "--bin", "crispd"], cwd=ROOT)
    with tempfile.TemporaryDirectory(prefix="shim-hot-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o711)
        pages_tool = Path(tmp) / "pages"
        run(["cc", "-O2", "-o", pages_tool, HERE / "pages.c"])
        plain = Path(tmp) / "plain"
        plain.mkdir(mode=0o711)
        hot, cold = instrumented_run(Trainer(plain, pages_tool), args.target_dir)
        with LoopMount(tmp) as loop:
            trainer = Trainer(loop.mnt, pages_tool)
            for _ in range(args.rounds):
                hot = page_round(trainer, loop, hot, cold, out)
    link(hot, out)
    print(f"make-list: wrote {out} ({len(hot)} symbols) and linked target/shim/{SHIM} with it",
          file=sys.stderr)


if __name__ == "__main__":
    main()
