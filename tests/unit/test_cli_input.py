"""The command line's flags are checked before anything runs, and each worker gets a node name of its own."""

from __future__ import annotations

import argparse
import re

import pytest

from models.settings import MiB, Settings
from orchestrator import cli

ID = "00000000-0000-0000-0000-000000000001"


def parse(*argv: str) -> argparse.Namespace:
    return cli._parser().parse_args(argv)


@pytest.mark.parametrize(("argv", "message"), [
    (["upload", "f", "s3://b/k", "--max-retries", "-5"], "invalid number '-5': a whole number from 0 to 1000"),
    (["upload", "f", "s3://b/k", "--max-retries", "1001"], "invalid number '1001': a whole number from 0 to 1000"),
    (["upload", "f", "s3://b/k", "--max-retries", "1e3"], "invalid number '1e3'"),
    (["upload", "f", "s3://b/k", "--part-size", "1e400"], "invalid size '1e400': too large"),
    (["upload", "f", "s3://b/k", "--part-size", "nan"], "invalid size 'nan'"),
    (["upload", "f", "s3://b/k", "--concurrency", "0"], "invalid number '0': a whole number from 1 to 1000"),
    (["upload", "f", "s3://b/k", "-c", "1001"], "invalid number '1001'"),
    (["upload", "f", "s3://b/k", "--priority", "1e9"], "invalid priority '1e9'"),
    (["priority", ID, "99999999999"], "invalid priority '99999999999': a whole number from -1000000 to 1000000"),
    (["resume", ID, "-c", "-1"], "invalid number '-1'"),
    (["ls", "--limit", "-1"], "invalid number '-1'"),
    (["ls", "--limit", "10000000000000000000000"], "invalid number"),
    (["worker", "--concurrency", "0"], "invalid number '0'"),
    (["worker", "-c", "-5"], "invalid number '-5'"),
    (["signer", "--threads", "0"], "invalid number '0'"),
    (["flower", "--port", "0"], "invalid port '0': a whole number from 1 to 65535"),
    (["metrics", "--port", "70000"], "invalid port '70000'"),
    (["db", "check", "--wait", "nan"], "invalid number of seconds 'nan': from 0 to 86400"),
    (["db", "check", "--wait", "inf"], "invalid number of seconds 'inf'"),
    (["db", "check", "--wait", "-1"], "invalid number of seconds '-1'"),
    (["sweep", "--older-than", "1e400d"], "invalid duration '1e400d'"),
    (["sweep", "--older-than", "nand"], "invalid duration 'nand'"),
    (["sweep", "--older-than", "3651d"], "at most 3650d"),
    (["demo", "--size", "0"], "invalid size '0': from 1B to 5TiB"),
    (["demo", "--size", "1e400"], "invalid size '1e400'"),
    (["demo", "--kill-at", "nan"], "invalid fraction 'nan'"),
    (["demo", "--kill-at", "inf"], "invalid fraction 'inf'"),
])
def test_a_bad_flag_is_refused_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exited:  # one line, no usage block, no traceback
        parse(*argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.match(r"s3ferry( [a-z]+)*: error: ", lines[0]), lines[0]
    assert message in lines[0] and lines[0].endswith("--help` shows the usage)")


@pytest.mark.parametrize("argv", [[], ["upload"], ["nosuchcommand"], ["ls", "--nosuchflag"], ["status"],
                                  ["db"], ["upload", "f", "s3://b/k", "extra"]])
def test_a_usage_error_is_one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "error: " in captured.err, captured.err
    assert captured.out == ""


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib import metadata

    with pytest.raises(SystemExit) as exited:
        parse("--version")
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"s3ferry {metadata.version('s3ferry')}\n"


@pytest.mark.parametrize(("argv", "verbose", "quiet"), [
    (["ls"], False, False),
    (["-v", "ls"], True, False),
    (["ls", "-v"], True, False),
    (["ls", "--verbose"], True, False),
    (["-q", "ls"], False, True),
    (["status", ID, "--quiet"], False, True),
    (["-v", "upload", "f", "s3://b/k", "-q"], True, True),
])
def test_verbose_and_quiet_go_before_or_after_the_command(argv: list[str], verbose: bool, quiet: bool) -> None:
    args = parse(*argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


@pytest.mark.parametrize("argv", [["ls"], ["status", ID], ["watch"], ["upload", "f", "s3://b/k"], ["resume", ID],
                                  ["retry", ID]])
def test_every_command_that_prints_state_has_json(argv: list[str]) -> None:
    assert parse(*argv).json is False
    assert parse(*argv, "--json").json is True


@pytest.mark.parametrize(("argv", "attribute", "value"), [
    (["upload", "f", "s3://b/k", "--max-retries", "0"], "max_retries", 0),
    (["upload", "f", "s3://b/k", "--max-retries", "1000"], "max_retries", 1000),
    (["upload", "f", "s3://b/k", "--part-size", "5MiB"], "part_size", 5 * MiB),
    (["upload", "f", "s3://b/k", "--priority", "-3"], "priority", -3),
    (["db", "check", "--wait", "600"], "wait", 600.0),
    (["sweep", "--older-than", "0s"], "older_than", cli.dt.timedelta(0)),
    (["sweep", "--older-than", "7d"], "older_than", cli.dt.timedelta(days=7)),
    (["flower", "--port", "65535"], "port", 65535),
])
def test_good_flags_pass(argv: list[str], attribute: str, value: object) -> None:
    assert getattr(parse(*argv), attribute) == value


@pytest.mark.parametrize("size", ["0", "4MiB", "6GiB"])
def test_a_part_size_outside_s3s_limits_is_refused_before_anything_starts(size: str) -> None:
    args = parse("upload", "/nonexistent/file", "s3://b/k", "--part-size", size)
    with pytest.raises(cli.UserError, match="part size .* (under S3's minimum of 5 MiB|over S3's maximum of 5 GiB)"):
        cli._upload(args, Settings())  # a fleet's settings: nothing is reached before the check


FLEET = Settings(database_url="postgresql+psycopg://u@h/db", broker_url="amqp://guest:guest@h:5672//", queue="q")


def test_a_worker_has_a_node_name_of_its_own_by_default() -> None:
    from workers import runtime

    argv = cli.worker_argv(parse("worker"), FLEET)
    assert f"--hostname=s3ferry-{runtime.NODE_TOKEN}@%h" in argv
    assert "--queues=q,q.recovered,q.control" in argv and "--concurrency=4" in argv
    assert cli.node_name("signer") == f"signer-{runtime.NODE_TOKEN}@%h"


def test_an_explicit_hostname_wins() -> None:
    argv = cli.worker_argv(parse("worker", "--hostname", "w1@%h", "-c", "2", "-P", "threads"), FLEET)
    assert [a for a in argv if a.startswith("--hostname")] == ["--hostname=w1@%h"]
    assert "--pool=threads" in argv and "--concurrency=2" in argv


def test_the_help_names_the_default_node_name(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # one line per flag
    with pytest.raises(SystemExit):
        parse("worker", "--help")
    assert "Celery node name (default s3ferry-TOKEN@HOST" in capsys.readouterr().out
    assert re.fullmatch(r"s3ferry-\S+@%h", cli.node_name("s3ferry"))
