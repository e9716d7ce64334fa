"""Register SuperNode public keys with a SuperLink that runs with ``--enable-supernode-auth``.

    python deploy/register_supernodes.py --superlink HOST:8000 \
        --root-certificates deploy/credentials/superexec/ca.crt --keys deploy/credentials/public-keys

flwr 1.41 keeps the registered keys in the SuperLink's database (``--database``), and a SuperNode
whose key is not registered is refused at activation. Registration goes through the Control API
with ``flwr supernode register KEY CONNECTION``; this script writes that connection into a
private ``FLWR_HOME``, waits for the SuperLink to answer, and registers every ``*.pub`` in
``--keys``. A key that is already registered counts as done, so the script is safe to re-run
(docker compose runs it on every ``up``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONNECTION = "fedrep-deployment"
ALREADY = "already in use"


def write_connection(flwr_home: Path, superlink: str, root_certificates: Path | None) -> None:
    """The ``flwr`` CLI's connection entry for the deployment (``$FLWR_HOME/config.toml``)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{superlink}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:  # flwr requires an absolute path here
        lines.append(f'root-certificates = "{root_certificates.resolve()}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def _flwr(args: list[str], flwr_home: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_HOME": str(flwr_home)}
    return subprocess.run(["flwr", *args], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)


def wait_for_superlink(flwr_home: Path, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        proc = _flwr(["supernode", "list", CONNECTION, "--format", "json"], flwr_home)
        if proc.returncode == 0 and '"success": true' in proc.stdout.replace('":true', '": true'):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"SuperLink did not answer within {deadline_s:.0f}s: "
                               f"{(proc.stdout + proc.stderr).strip()[-800:]}")
        time.sleep(1.0)


def register(flwr_home: Path, key: Path) -> str:
    """The node id for ``key``, or 'already registered'."""
    proc = _flwr(["supernode", "register", str(key), CONNECTION, "--name", key.stem,
                  "--format", "json"], flwr_home)
    text = proc.stdout + proc.stderr
    if ALREADY in text:
        return "already registered"
    try:  # `--format json` prints one (pretty-printed) JSON object on stdout
        reply = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        reply = {}
    if proc.returncode != 0 or not reply.get("success"):
        raise RuntimeError(f"registering {key} failed (exit {proc.returncode}): {text.strip()[-800:]}")
    return f"node {reply['node-id']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink (port 8000)")
    trust = parser.add_mutually_exclusive_group(required=True)
    trust.add_argument("--root-certificates", type=Path, help="the deployment CA (ca.crt)")
    trust.add_argument("--insecure", action="store_true", help="plain HTTP (no node auth possible)")
    parser.add_argument("--keys", type=Path, required=True, help="folder of SuperNode *.pub keys")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the SuperLink")
    args = parser.parse_args(argv)
    keys = sorted(args.keys.glob("*.pub"))
    if not keys:
        parser.error(f"--keys {args.keys}: no *.pub files; run deploy/credentials.py first")
    if args.root_certificates is not None and not args.root_certificates.is_file():
        parser.error(f"--root-certificates {args.root_certificates} does not exist; run "
                     "deploy/credentials.py first")
    with tempfile.TemporaryDirectory(prefix="flwr-home-") as home:
        flwr_home = Path(home)
        write_connection(flwr_home, args.superlink, args.root_certificates)
        try:
            wait_for_superlink(flwr_home, args.wait)
            for key in keys:
                print(f"{key.stem}: {register(flwr_home, key)}", flush=True)
        except RuntimeError as err:
            print(f"register_supernodes: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
