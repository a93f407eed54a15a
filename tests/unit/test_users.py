"""Local users: the users file (bcrypt hashes, 0600), ``corral user add`` (password never from
argv), password checks that cost the same for an unknown user, sessions that expire, and the
login rate limit."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from corral.api.auth import create_token
from corral.api.session import LoginLimiter, SessionStore
from corral.api.users import User, UsersFile, add_user, hash_password
from corral.cli.main import cli
from corral.errors import HostError, SpecError


def write_users(path: Path, entries: list[dict[str, object]]) -> Path:
    path.write_text(yaml.safe_dump(entries))
    path.chmod(0o600)
    return path


def test_add_user_stores_a_private_bcrypt_hash_and_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    add_user(path, "alice", "correct horse", ("admin",))
    add_user(path, "bob", "battery staple", ("operators", "viewers"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "correct horse" not in text and "battery staple" not in text
    entries = yaml.safe_load(text)
    assert [e["name"] for e in entries] == ["alice", "bob"]
    assert entries[0]["passwordHash"].startswith("$2b$12$")
    users = UsersFile.load(path)
    assert users.verify("alice", "correct horse") == User("alice", ("admin",))
    assert users.verify("bob", "battery staple") == User("bob", ("operators", "viewers"))
    assert users.verify("alice", "battery staple") is None
    assert users.verify("carol", "correct horse") is None
    add_user(path, "alice", "new password", ("viewers",))  # a new password and roles
    users = UsersFile.load(path)
    assert users.verify("alice", "correct horse") is None
    assert users.verify("alice", "new password") == User("alice", ("viewers",))
    assert len(users.entries) == 2


def test_user_add_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    """``corral user add`` (often root) writes a temporary file next to the users file: a link
    planted there (a shared directory) must not make it overwrite the file it points to."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "users.yaml"
    (tmp_path / ".users.yaml.tmp").symlink_to(victim)
    add_user(path, "alice", "correct horse", ("admin",))
    assert victim.read_text() == "precious\n"
    assert UsersFile.load(path).verify("alice", "correct horse") == User("alice", ("admin",))
    assert not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_token_create_never_writes_through_a_link(tmp_path: Path) -> None:
    """``corral token create`` (often root): a link at the tokens file's path, even one whose
    target does not exist yet, must not make it create or append to another file."""
    target = tmp_path / "elsewhere"
    (tmp_path / "tokens").symlink_to(target)
    with pytest.raises(HostError, match="tokens file"):
        create_token(tmp_path / "tokens", "ci")
    assert not target.exists()


def test_passwords_bcrypt_would_cut_short_are_refused(tmp_path: Path) -> None:
    long = "x" * 72
    with pytest.raises(SpecError) as caught:
        hash_password(long + "y")
    assert caught.value.issues[0].loc == "password"
    with pytest.raises(SpecError):
        hash_password("")
    path = write_users(tmp_path / "u", [{"name": "a", "passwordHash": hash_password(long, 4),
                                          "roles": []}])  # fmt: skip
    users = UsersFile.load(path)
    assert users.verify("a", long) is not None
    assert users.verify("a", long + "anything") is None  # never "the first 72 bytes match"


def test_a_public_or_broken_users_file_is_refused(tmp_path: Path) -> None:
    path = write_users(tmp_path / "u", [{"name": "a", "passwordHash": hash_password("p", 4)}])
    path.chmod(0o644)
    with pytest.raises(HostError, match="readable by others"):
        UsersFile.load(path)
    path.chmod(0o600)
    assert UsersFile.load(path).entries["a"].user.roles == ()
    for bad, loc in (
        ([{"name": "a", "passwordHash": "plain"}], "[0].passwordHash"),
        ([{"name": "a b", "passwordHash": hash_password("p", 4)}], "[0].name"),
        ([{"name": "a", "passwordHash": hash_password("p", 4), "roles": "admin"}], "[0].roles"),
        ([{"name": "a", "password": "p"}], "[0]"),
    ):
        write_users(path, bad)
        with pytest.raises(SpecError) as caught:
            UsersFile.load(path)
        assert caught.value.issues[0].loc == f"{path}{loc}"
    with pytest.raises(HostError):
        add_user(tmp_path / "missing-dir" / "u", "a", "p", ())


def test_an_unknown_user_costs_what_a_wrong_password_costs(tmp_path: Path) -> None:
    path = write_users(tmp_path / "u", [{"name": "a", "passwordHash": hash_password("p", 10),
                                          "roles": []}])  # fmt: skip
    users = UsersFile.load(path)
    users.verify("nobody", "warm-up")  # the dummy hash is made once

    def timed(name: str) -> float:
        best = float("inf")
        for _ in range(6):
            began = time.perf_counter()
            assert users.verify(name, "wrong") is None
            best = min(best, time.perf_counter() - began)
        return best

    wrong, unknown = timed("a"), timed("nobody")
    # both do one cost-10 bcrypt (a cost-4 dummy would be ~60x faster; the machine is loaded)
    assert 1 / 3 < unknown / wrong < 3, (wrong, unknown)


def test_user_add_reads_the_password_from_stdin_never_argv(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    result = CliRunner().invoke(
        cli, ["user", "add", "alice", "--role", "admin", "--role", "ops", "--file", str(path)],
        input="s3cret-Pass\n",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert UsersFile.load(path).verify("alice", "s3cret-Pass") == User("alice", ("admin", "ops"))
    result = CliRunner().invoke(cli, ["user", "add", "x y", "--file", str(path)], input="p\n")
    assert result.exit_code == 1 and "name" in result.output
    result = CliRunner().invoke(cli, ["user", "add", "bob", "--file", str(path), "--password", "p"])
    assert result.exit_code == 2  # there is no such option
    result = CliRunner().invoke(cli, ["user", "remove", "alice", "--file", str(path)])
    assert result.exit_code == 0 and UsersFile.load(path).entries == {}
    result = CliRunner().invoke(cli, ["user", "remove", "alice", "--file", str(path)])
    assert result.exit_code == 1 and "no user 'alice'" in result.output


def test_sessions_end_when_idle_or_too_old_and_on_logout() -> None:
    now = [1000.0]
    store = SessionStore(idle_seconds=60, max_seconds=300, clock=lambda: now[0])
    alice = User("alice", ("admin",))
    session = store.create(alice)
    assert len(session.id) >= 40 and len(session.csrf) >= 40 and session.id != session.csrf
    now[0] += 59
    assert store.get(session.id) is session  # and its idle clock starts again
    now[0] += 59
    assert store.get(session.id) is session
    now[0] += 61
    assert store.get(session.id) is None
    session = store.create(alice)
    for _ in range(7):
        now[0] += 50
        found = store.get(session.id)
    assert found is None  # 300 s after login, however busy
    other = store.create(alice)
    store.drop(other.id)
    assert store.get(other.id) is None
    assert store.get("forged") is None


def test_login_failures_are_limited_per_user_and_client() -> None:
    now = [0.0]
    limiter = LoginLimiter(max_failures=3, window_seconds=60, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("alice", "10.0.0.1") is None
        limiter.failed("alice", "10.0.0.1")
    wait = limiter.retry_after("alice", "10.0.0.1")
    assert wait is not None and 59 <= wait <= 60
    assert limiter.retry_after("alice", "10.0.0.2") is None  # another client
    assert limiter.retry_after("bob", "10.0.0.1") is None  # another user
    for name in ("b", "c", "d", "e", "f", "g", "h", "i", "j"):  # spraying names
        limiter.failed(name, "10.0.0.1")
    assert limiter.retry_after("zed", "10.0.0.1") is not None  # 12 failures from one client
    now[0] += 61
    assert limiter.retry_after("alice", "10.0.0.1") is None
    assert limiter.retry_after("zed", "10.0.0.1") is None


def test_users_file_default_comes_from_the_daemon_config(tmp_path: Path) -> None:
    from corral.manager import load_manager_config

    config = tmp_path / "corral.yaml"
    config.write_text(f"users: {tmp_path / 'users.yaml'}\n")
    loaded = load_manager_config(config, stateDir=str(tmp_path / "state"))
    assert loaded.users == tmp_path / "users.yaml"
    assert os.fspath(loaded.users).endswith("users.yaml")
