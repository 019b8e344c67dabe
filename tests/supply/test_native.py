"""OS package attribution with fake `rpm` / `dpkg` tools (the real ones differ per host), /proc maps
parsing, and debian/copyright license extraction."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from xcstack.supply import native


def _tool(bindir: Path, name: str, script: str) -> None:
    path = bindir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    return bindir


RPM_LINE = "openssl-libs\t3.0.12-5.oe2203\tx86_64\topenEuler\tApache-2.0\thttps://www.openssl.org\topenssl-3.0.12-5.oe2203.src.rpm"


def test_rpm_batch_maps_each_path(fake_bin: Path) -> None:
    log = fake_bin / "calls"
    _tool(fake_bin, "rpm", f"""echo "call $#" >> {log}
printf '%s\\n' '{RPM_LINE}'
echo 'file /opt/x/libfoo.so is not owned by any package'
printf '%s\\n' 'glibc\t2.34-100.oe2203\tx86_64\topenEuler\tLGPLv2+ and GPLv2+\thttps://www.gnu.org\tglibc-2.34.src.rpm'
""")
    paths = ["/usr/lib64/libssl.so.3", "/opt/x/libfoo.so", "/usr/lib64/libc.so.6"]
    owners = native.rpm_owners(paths)
    assert len(log.read_text().splitlines()) == 1  # one batched call
    assert owners["/usr/lib64/libssl.so.3"].name == "openssl-libs"
    assert owners["/usr/lib64/libssl.so.3"].license.expression == "Apache-2.0"
    assert owners["/usr/lib64/libssl.so.3"].source == "openssl-3.0.12-5.oe2203.src.rpm"
    assert "/opt/x/libfoo.so" not in owners
    assert owners["/usr/lib64/libc.so.6"].license.expression is None  # Fedora-style name kept as text
    assert owners["/usr/lib64/libc.so.6"].license.name == "LGPLv2+ and GPLv2+"


def test_rpm_multi_owner_output_falls_back_to_one_query_per_path(fake_bin: Path) -> None:
    log = fake_bin / "calls"
    _tool(fake_bin, "rpm", f"""echo "call $#" >> {log}
case "$#" in
  4) printf '%s\\n' '{RPM_LINE}' ;;
  *) printf '%s\\n%s\\n%s\\n' '{RPM_LINE}' '{RPM_LINE}' '{RPM_LINE}' ;;
esac
""")
    owners = native.rpm_owners(["/a.so", "/b.so"])  # 3 lines for 2 paths: misaligned
    assert set(owners) == {"/a.so", "/b.so"}
    assert len(log.read_text().splitlines()) == 3  # the batch, then one per path


def test_dpkg_usrmerge_twins_and_diversions(fake_bin: Path) -> None:
    _tool(fake_bin, "dpkg", """echo 'diversion by foo from: /lib/x86_64-linux-gnu/libz.so.1'
echo 'libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6'
echo 'libssl3:amd64, libssl3-dbg:amd64: /usr/lib/x86_64-linux-gnu/libssl.so.3'
echo "dpkg-query: no path found matching pattern /usr/lib/x86_64-linux-gnu/libc.so.6" >&2
exit 1
""")
    owners = native.dpkg_owners(["/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libssl.so.3",
                                 "/opt/none.so"])
    assert owners == {"/usr/lib/x86_64-linux-gnu/libc.so.6": "libc6:amd64",
                      "/usr/lib/x86_64-linux-gnu/libssl.so.3": "libssl3:amd64"}


def test_os_owners_prefers_rpm_on_rhel_family(fake_bin: Path) -> None:
    _tool(fake_bin, "rpm", f"printf '%s\\n' '{RPM_LINE}'\n")
    _tool(fake_bin, "dpkg", "exit 1\n")
    _tool(fake_bin, "dpkg-query", "exit 1\n")
    owners = native.os_owners(["/usr/lib64/libssl.so.3"], "rhel")
    assert owners["/usr/lib64/libssl.so.3"].manager == "rpm"


def test_no_package_manager_gives_no_owner(fake_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(fake_bin))
    assert native.os_owners(["/usr/lib/libc.so.6"], "debian") == {}


def test_debian_copyright_license(tmp_path: Path) -> None:
    doc = tmp_path / "usr/share/doc/libfoo1"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        "Upstream-Name: foo\n\n"
        "Files: *\nCopyright: 2020 Foo\nLicense: LGPL-2.1+ or MIT\n\n"
        "Files: debian/*\nLicense: GPL-2+\n"
    )
    info = native.debian_copyright_license("libfoo1:amd64", root=str(tmp_path))
    assert info.expression == "LGPL-2.1-or-later OR MIT"
    assert native.debian_copyright_license("missing", root=str(tmp_path)).known is False


def test_mapped_files_reads_elf_objects_of_this_process() -> None:
    files = native.mapped_files("self")
    assert any(os.path.basename(f).startswith("libc") for f in files) or files  # static builds: no libc.so
    assert all(f.startswith("/") and not f.startswith("/dev/") for f in files)
    assert all(".so" in os.path.basename(f) or open(f, "rb").read(4) == b"\x7fELF" for f in files)
