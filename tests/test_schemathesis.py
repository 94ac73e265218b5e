"""Schemathesis against the real server: no server error, no schema violation (SPEC §3, §7, §8).

The real ``sparrow serve`` runs on 127.0.0.1 with the mock engines, and the
``st`` command reads its ``/openapi.json`` and runs every phase (examples,
coverage, fuzzing, stateful) with every check — response schemas and status
codes, content types and headers, SSE events against their schemas, invalid
input refused, missing or ignored auth, ``Allow`` on 405 — once with auth off and
once with auth on and a paid key. The ids in paths are real: one chain to work
on, and a second one, and a branch node, for the operations that delete.

Only one check is widened, for four operations where a schema cannot say what the
server needs (``positive_data_acceptance``: a schema-valid request must be
accepted): ``POST /api/chains`` needs a file that is audio FFmpeg decodes,
``GET …/peaks`` (a node's and the spine's) takes ``pixels_per_second`` or
``samples_per_pixel``, not both, and ``POST …/branch`` takes ``prompt`` or
``prompts``, not both, with a ``count`` that agrees with ``prompts``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import SAMPLE, bearer
from live import free_port, server_process, sparrow_cli

# Per operation and phase; CI's size. SCHEMATHESIS_EXAMPLES=200 makes a longer run.
EXAMPLES_PER_OPERATION = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "15"))
SEED = 20261121

pytestmark = pytest.mark.slow


def make_chain(client: httpx.Client) -> tuple[str, str]:
    created = client.post("/api/chains", files={"file": ("clip.flac", SAMPLE.read_bytes())})
    assert created.status_code == 201, created.text
    body = created.json()
    return body["chain"]["id"], body["root"]["id"]


def make_ready_child(client: httpx.Client, parent_id: str) -> str:
    made = client.post(f"/api/nodes/{parent_id}/branch", json={"duration_s": 1, "seed": 1})
    assert made.status_code == 202, made.text
    node_id: str = made.json()["nodes"][0]["id"]
    deadline = time.monotonic() + 30
    while client.get(f"/api/nodes/{node_id}").json()["status"] != "ready":
        assert time.monotonic() < deadline, "the branch did not become ready"
        time.sleep(0.05)
    return node_id


def config(client: httpx.Client, headers: dict[str, str]) -> str:
    """A schemathesis.toml: real ids, and the two operations' widened acceptance."""
    chain_id, root_id = make_chain(client)
    victim_id, _ = make_chain(client)
    child_id = make_ready_child(client, root_id)
    header_lines = "".join(f'{k} = "{v}"\n' for k, v in headers.items())
    return f"""
[headers]
{header_lines}
[parameters]
chain_id = "{chain_id}"
node_id = "{root_id}"
parent_id = "{root_id}"

[[operations]]
include-operation-id = "delete_chain"
parameters = {{ chain_id = "{victim_id}" }}

[[operations]]
include-operation-id = "discard_node"
parameters = {{ node_id = "{child_id}" }}

[[operations]]
include-operation-id = "create_chain"
checks.positive_data_acceptance.expected-statuses = [201, 401, 413, 415, 422, 429]

[[operations]]
include-operation-id = "node_peaks"
checks.positive_data_acceptance.expected-statuses = [200, 401, 404, 409, 422]

[[operations]]
include-operation-id = "spine_peaks"
checks.positive_data_acceptance.expected-statuses = [200, 401, 404, 409, 422]

[[operations]]
include-operation-id = "branch_node"
checks.positive_data_acceptance.expected-statuses = [202, 401, 404, 409, 422, 429]

[[operations]]
include-operation-id = "chain_events"
max-stream-events = 5
request-timeout = 2
"""


def run_schemathesis(tmp_path: Path, *, auth: bool) -> None:
    data_dir, port = tmp_path / "data", free_port()
    base = f"http://127.0.0.1:{port}"
    headers: dict[str, str] = {}
    if auth:
        created = sparrow_cli(data_dir, "keys", "create", "--tier", "paid")
        assert created.returncode == 0, created.stderr
        headers = bearer(created.stdout.strip().splitlines()[-1])
    env = {
        "SPARROW_ENGINE": "mock",
        "SPARROW_MOCK_STEP_MS": "0",
        "SPARROW_MAX_COUNT": "2",
        "SPARROW_AUTH": "on" if auth else "off",
    }
    log = tmp_path / "server.log"
    with server_process(data_dir, port, log=log, **env) as proc:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            (tmp_path / "schemathesis.toml").write_text(config(client, headers))
        st = Path(sys.executable).with_name("st")
        result = subprocess.run(
            [
                str(st),
                "run",
                f"{base}/openapi.json",
                "--checks=all",
                f"--max-examples={EXAMPLES_PER_OPERATION}",
                f"--seed={SEED}",
                "--generation-database=none",
                "--request-timeout=20",
                "--no-color",
                "--workers=1",  # hypothesis runs ast.parse, which races in threads on 3.11
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
        assert proc.poll() is None, "the server died"
        assert httpx.get(f"{base}/healthz").status_code == 200
    report = result.stdout + result.stderr
    cases = re.search(r"(\d+) generated", report)
    summary = report[report.rfind("SUMMARY") :]
    print(f"schemathesis, auth {'on' if auth else 'off'}:", summary)
    assert result.returncode == 0 and cases, report[-20_000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-5000:]


def test_schemathesis_auth_off(tmp_path: Path) -> None:
    run_schemathesis(tmp_path, auth=False)


def test_schemathesis_auth_on(tmp_path: Path) -> None:
    run_schemathesis(tmp_path, auth=True)
