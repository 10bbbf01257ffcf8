"""What the commands print: data on stdout (JSON when asked), progress and notes on stderr,
none of it with --quiet; human units in text; the exit status the README's table gives."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from tests.conftest import sha256_of_object, write_random
from tests.integration.helpers import MiB, run_cli

pytestmark = pytest.mark.integration


def test_upload_json_is_the_final_record_and_nothing_else(worker, service_env, s3, bucket,  # type: ignore[no-untyped-def]
                                                          tmp_path: Path) -> None:
    source = tmp_path / "j.bin"
    sha256 = write_random(source, 12 * MiB)

    run = run_cli(["upload", str(source), f"s3://{bucket}/j.bin", "--part-size", "5MiB", "--json"], service_env)

    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no bar, no notes
    record = json.loads(run.stdout)
    assert (record["status"], record["size"], record["bytes_done"], record["parts_done"]) == (
        "complete", 12 * MiB, 12 * MiB, 3)
    assert sha256_of_object(s3, bucket, "j.bin") == sha256
    # the final rate is the part phase's, completion's time apart
    assert record["parts_seconds"] > 0 and record["completion_seconds"] >= 0
    assert record["rate"] == pytest.approx(12 * MiB / record["parts_seconds"])

    listed = run_cli(["ls", "--json"], service_env)
    assert listed.returncode == 0, listed.stderr
    [mine] = [u for u in json.loads(listed.stdout) if u["id"] == record["id"]]
    assert (mine["status"], mine["size"], mine["destination"]) == ("complete", 12 * MiB, f"s3://{bucket}/j.bin")

    watched = run_cli(["watch", record["id"], "--json"], service_env)  # finished: one look, exit 0
    assert watched.returncode == 0, watched.stderr
    [line] = watched.stdout.splitlines()
    assert json.loads(line)["status"] == "complete"

    status = run_cli(["status", record["id"]], service_env)
    assert status.returncode == 0, status.stderr
    shown = {key: value.strip() for key, _, value in (line.partition(" ") for line in status.stdout.splitlines())}
    assert shown["size"] == f"12.0 MiB ({12 * MiB} B)"
    assert re.fullmatch(r"[0-9.]+ [KMG]iB/s", shown["rate"]), shown["rate"]
    assert re.fullmatch(r"[0-9.]+ s", shown["parts_seconds"]), shown["parts_seconds"]


def test_quiet_prints_the_id_only_and_the_text_says_where_it_went(worker, service_env, s3, bucket,  # type: ignore[no-untyped-def]
                                                                    tmp_path: Path) -> None:
    source = tmp_path / "q.bin"
    sha256 = write_random(source, 6 * MiB)

    quiet = run_cli(["upload", str(source), f"s3://{bucket}", "--part-size", "5MiB", "-q"], service_env)

    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    uuid.UUID(quiet.stdout.strip())  # the id, alone
    assert sha256_of_object(s3, bucket, "q.bin") == sha256  # s3://bucket: the file's name

    loud = run_cli(["upload", str(source), f"s3://{bucket}/loud.bin", "--part-size", "5MiB"], service_env)
    assert loud.returncode == 0, loud.stderr
    uuid.UUID(loud.stdout.strip())  # data on stdout; the rest on stderr
    last = loud.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"complete: s3://{bucket}/loud\.bin ETag \S+; 6\.0 MiB in \d+:\d\d:\d\d: parts [0-9.]+ s at "
                        r"[0-9.]+ [KMG]?i?B/s, completion [0-9.]+ s", last), last
