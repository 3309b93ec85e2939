"""Helpers shared by the tests (tests/host and tests/vm): ``from support.cli import run_cli``.

- cli: the CLI in this process (call_main) or as a child process (run_cli), and the check
  that a user error is one line on stderr;
- images: sparse image files;
- serve: a spawned ``serve`` (its first line, its logs), the host tests' fake of it;
- control_fakes, fake_serve, sim_guest, faulty_nbd: what the host tests run their code
  against (a control socket, the daemon over a fake device, a guest on the simulator, an
  NBD server that misbehaves on demand).

Importable as ``support`` because tests/ is on sys.path: pytest (its default "prepend"
import mode) puts there the folder of tests/conftest.py; scripts run outside pytest
(tests/vm/soak.py, the fake daemon's child process) put it there themselves.
"""
