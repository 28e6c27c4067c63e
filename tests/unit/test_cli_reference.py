"""docs/reference/cli.md is generated from the ``closedloop`` command's own help; it must be the committed file, and
it must name every command and option the command line has."""

from __future__ import annotations

from closedloop.devtools import cli_reference


def test_the_committed_reference_is_current():
    assert cli_reference.TARGET.exists(), f"docs/reference/cli.md missing: run {cli_reference.COMMAND}"
    assert cli_reference.TARGET.read_text() == cli_reference.render(), (
        f"docs/reference/cli.md is stale (a command, option or help text of closedloop.cli changed): run "
        f"{cli_reference.COMMAND} and commit the result")


def test_every_command_and_option_is_in_the_reference():
    cmd = cli_reference.command()
    text = cli_reference.render()
    ctx = cmd.context_class(cmd, info_name="closedloop")
    seen = 0
    stack = [(cmd, ctx)]
    while stack:
        c, cctx = stack.pop()
        assert f"`{cctx.command_path}`" in text, cctx.command_path
        for param in c.get_params(cctx):
            for opt in param.opts:
                assert opt in text, f"{cctx.command_path} {opt}"
            seen += 1
        for name in getattr(c, "list_commands", lambda _ctx: [])(cctx):
            sub = c.get_command(cctx, name)
            stack.append((sub, sub.context_class(sub, info_name=name, parent=cctx)))
    assert seen >= 40, seen
    for command in ("closedloop quarantine release", "closedloop rollout-stop", "closedloop serve"):
        assert f"`{command}`" in text
