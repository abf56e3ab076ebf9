"""The README and docs/ stay true to the code they document."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.config import SETTINGS

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
POLICY = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_quickstart_commands() -> None:
    head = README[:600]
    assert "uv run relay demo" in head and "uv run pytest" in head


def test_configuration_table_lists_every_setting_with_its_flag() -> None:
    for setting in SETTINGS:
        flag = "—" if setting.secret else f"`{setting.flag}`"
        assert f"| `{setting.env}` | {flag} |" in CONFIGURATION, setting.env


def test_the_policy_block_shows_the_defaults_it_claims_to_show() -> None:
    import tomllib

    from relay.core.policy import TABLE_KEYS, Policy

    section = POLICY
    block = re.search(r"```toml\n(\[policy\]\n.*?)```", section, re.DOTALL)
    assert block is not None
    table = tomllib.loads(block.group(1))["policy"]
    assert Policy.from_table(table) == Policy()
    # Every key of the table is shown (a commented-out one where the default is "unset").
    for key in TABLE_KEYS:
        assert re.search(rf"^#? ?{key} = ", block.group(1), re.MULTILINE), key


def test_the_policy_recipe_is_a_configuration_the_relay_takes(tmp_path: Path) -> None:
    import re

    from relay.config import load_config

    recipe = POLICY[POLICY.index("## Recipe"):]
    toml = re.search(r"```toml\n(.*?)```", recipe, re.DOTALL)
    env = re.search(r"```sh\n(.*?)```", recipe, re.DOTALL)
    assert toml is not None and env is not None
    path = tmp_path / "relay.toml"
    path.write_text(toml.group(1))
    environ = {}
    for line in env.group(1).splitlines():
        name, _, value = line.split("#")[0].strip().partition("=")
        if name and name not in ("RELAY_JWT_SECRET", "RELAY_CONFIG"):  # placeholders
            environ[name] = value
    assert {s.env for s in SETTINGS} >= set(environ)
    environ["RELAY_CONFIG"] = str(path)
    config = load_config(environ)
    assert config.policy.locked >= {"model", "instructions", "tools"}
    assert config.policy.client_may_send("input_audio_buffer.append")
    assert config.allows_model(config.model) and not config.allows_model("gpt-realtime-2.1")
# -- the README's runnable command blocks, run as written --------------------------------------

#: A ```sh block right after ``<!-- runnable -->`` is run as it stands; after
#: ``<!-- runnable: with relay demo -->``, with ``relay demo`` running first, as the README says.
RUNNABLE = re.compile(r"<!-- runnable(: with relay demo)? -->\n```sh\n(.*?)```", re.S)
#: Seconds one block may take, servers it starts included.
BLOCK_TIMEOUT = 120

PRELUDE = r"""
set -euo pipefail
# `uv run X` runs X from the test's own environment (its bin directory is first on PATH).
uv() { [ "$1" = run ] || { echo "only 'uv run' is shimmed" >&2; return 127; }; shift; "$@"; }
# `CMD &` in a block: go on once CMD says it is listening, as a reader would wait for it.
background() {
  local -; set +x  # (its own lines would go through the pipe it reads)
  local fifo="$TMPDIR/ready.$RANDOM$RANDOM"
  mkfifo "$fifo"
  { "$@" 2>&1 | { ready=0
      while IFS= read -r line; do
        printf '%s\n' "$line"
        if [ $ready = 0 ]; then
          case $line in *" listening on "*|*": open http://"*) ready=1; echo > "$fifo";; esac
        fi
      done
      [ $ready = 1 ] || : > "$fifo"; }; } &
  IFS= read -r < "$fifo" || { echo "background: '$*' ended before it listened" >&2; return 1; }
  rm -f "$fifo"
}
set -x
"""


def runnable_blocks() -> list[tuple[str, bool]]:
    return [(body, bool(demo)) for demo, body in RUNNABLE.findall(README)]


def script(body: str, with_demo: bool) -> str:
    lines = ["background uv run relay demo"] if with_demo else []
    for line in body.splitlines():
        started = re.fullmatch(r"(.*?\S)\s*&\s*(#.*)?", line)
        lines.append(f"background {started.group(1)}" if started else line)
    return PRELUDE + "\n".join(lines) + "\n"


def ports_free(*ports: int) -> bool:
    import socket

    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def isolation() -> list[str] | None:
    """How to run a block: in a network namespace of its own (nothing but loopback, and the
    ports the README names are free), else on this machine if those ports are free now."""
    import shutil
    import subprocess

    if shutil.which("unshare") and shutil.which("ip"):
        probe = ["unshare", "-rn", "ip", "link", "set", "lo", "up"]
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec bash "$0"']
    return ["bash"] if ports_free(8000, 8765) else None


def test_the_readme_has_runnable_blocks_to_run() -> None:
    blocks = runnable_blocks()
    assert [demo for _, demo in blocks] == [True, False]
    assert any("relay talk\n" in body or "relay talk " in body for body, _ in blocks)
    assert any("mockrealtime serve" in body and "RELAY_API_KEYS" in body for body, _ in blocks)


def test_background_lines_wait_for_their_server() -> None:
    text = script("uv run relay serve &   # a comment\nuv run relay talk", False)
    assert "background uv run relay serve\nuv run relay talk\n" in text


@pytest.mark.parametrize("index", range(len(RUNNABLE.findall(README))))
def test_each_runnable_block_of_the_readme_runs(index: int, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    body, with_demo = runnable_blocks()[index]
    runner = isolation()
    if runner is None:
        pytest.skip("no network namespace here, and port 8000 or 8765 is taken")
    path = tmp_path / "block.sh"
    path.write_text(script(body, with_demo))
    # The README is read in a clone: paths it names (the phone fixture) resolve as they do there,
    # while everything a block writes (reply.wav, out.wav) stays in this test's own directory.
    (tmp_path / "tests").symlink_to(ROOT / "tests", target_is_directory=True)
    env = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "HOME": str(tmp_path / "home"),
        "TMPDIR": str(tmp_path),
        "LANG": "C.UTF-8",
    }
    log = tmp_path / "block.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*runner, str(path)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the block and every server it started: one group
        )
        try:
            status = process.wait(timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the servers the block left running
            except ProcessLookupError:
                pass
            process.wait()
    output = log.read_text(errors="replace")
    assert status == 0, f"block {index} failed ({status}):\n{body}\n--- its output ---\n{output}"
    assert "reply:" in output and "written to reply.wav" in output, output
