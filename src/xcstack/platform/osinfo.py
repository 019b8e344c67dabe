"""Operating system identification from /etc/os-release and /etc/lsb-release.

Quirks handled:
- openEuler says `ID=openEuler` (ids are normalised to lower case: `openeuler`);
- some Kylin hosts say Debian/Ubuntu in os-release but `DISTRIB_ID=Kylin` in /etc/lsb-release (and
  ship /etc/kylin-release): a domestic distribution named by lsb-release wins over a generic one;
- UOS says `ID=uos` (UnionTech OS Server/Desktop); Deepin `ID=deepin`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

# normalised id -> canonical display name
KNOWN_OS: dict[str, str] = {
    "kylin": "Kylin",
    "neokylin": "NeoKylin",
    "openkylin": "openKylin",
    "kylinsec": "KylinSec",
    "uos": "UOS (UnionTech OS)",
    "deepin": "Deepin",
    "openeuler": "openEuler",
    "euleros": "EulerOS",
    "hce": "Huawei Cloud EulerOS",
    "anolis": "Anolis OS",
    "alinux": "Alibaba Cloud Linux",
    "tencentos": "TencentOS Server",
    "opencloudos": "OpenCloudOS",
    "bclinux": "BigCloud Linux",
    "ctyunos": "CTyunOS",
    "isoft": "iSoft Server OS",
    "nfs": "NFSChina Server",
    "debian": "Debian",
    "ubuntu": "Ubuntu",
    "centos": "CentOS",
    "rhel": "Red Hat Enterprise Linux",
    "rocky": "Rocky Linux",
    "almalinux": "AlmaLinux",
    "fedora": "Fedora",
    "opensuse-leap": "openSUSE Leap",
    "sles": "SUSE Linux Enterprise Server",
    "alpine": "Alpine Linux",
    "arch": "Arch Linux",
}
DOMESTIC_OS = frozenset(
    {"kylin", "neokylin", "openkylin", "kylinsec", "uos", "deepin", "openeuler", "euleros", "hce", "anolis",
     "alinux", "tencentos", "opencloudos", "bclinux", "ctyunos", "isoft", "nfs"}
)  # fmt: skip
# Spellings seen in lsb-release / os-release ids -> normalised id.
_ALIASES: dict[str, str] = {
    "uniontech": "uos",
    "uniontechos": "uos",
    "uos-server": "uos",
    "kylin-server": "kylin",
    "kylinos": "kylin",
    "openeuler": "openeuler",
    "red hat": "rhel",
    "redhat": "rhel",
    "redhatenterpriseserver": "rhel",
}
_RPM = {"openeuler", "euleros", "hce", "anolis", "alinux", "tencentos", "opencloudos", "bclinux", "ctyunos",
        "centos", "rhel", "rocky", "almalinux", "fedora", "kylinsec", "neokylin", "isoft", "nfs"}  # fmt: skip
_DEB = {"debian", "ubuntu", "deepin", "openkylin"}
_RELEASE_FILES = (("kylin-release", "kylin"), ("openEuler-release", "openeuler"), ("UnionTech-release", "uos"))


@dataclass
class OsInfo:
    id: str  # normalised lower-case id: kylin, uos, openeuler, debian, ...
    name: str  # canonical display name
    version_id: str = ""
    pretty_name: str = ""
    id_like: list[str] = field(default_factory=list)
    family: str = "unknown"  # debian | rhel | other | unknown (package tooling)
    source: str = "none"  # which file decided the id
    os_release_id: str | None = None
    lsb_id: str | None = None
    domestic: bool = False
    kernel: str = ""
    kernel_version: list[int] = field(default_factory=list)  # [major, minor, patch]


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines with shell quoting (os-release(5), lsb-release)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        try:
            parts = shlex.split(value, comments=False, posix=True)
            val = " ".join(parts)
        except ValueError:
            val = value.strip().strip("'\"")
        out[key] = val
    return out


def normalise_id(raw: str | None) -> str:
    if not raw:
        return ""
    s = raw.strip().lower()
    s = _ALIASES.get(s, s)
    s2 = s.replace(" ", "")
    s2 = _ALIASES.get(s2, s2)
    if s2.startswith("kylin") and s2 not in KNOWN_OS:
        return "kylin"
    if s2.startswith("uniontech") or s2 == "uos":
        return "uos"
    return s2


def kernel_tuple(release: str) -> list[int]:
    nums: list[int] = []
    for chunk in release.split(".")[:3]:
        digits = ""
        for ch in chunk:
            if ch.isdigit():
                digits += ch
            else:
                break
        if not digits:
            break
        nums.append(int(digits))
    return nums


def identify_os(
    os_release: str | None,
    lsb_release: str | None = None,
    extra_release_files: dict[str, str] | None = None,
    kernel: str = "",
) -> OsInfo:
    osr = parse_env_file(os_release) if os_release else {}
    lsb = parse_env_file(lsb_release) if lsb_release else {}
    osr_id = normalise_id(osr.get("ID")) or None
    lsb_id = normalise_id(lsb.get("DISTRIB_ID")) or None
    chosen = osr_id or ""
    source = "os-release" if osr_id else "none"
    if lsb_id and lsb_id != osr_id and (lsb_id in DOMESTIC_OS or not osr_id):
        chosen, source = lsb_id, "lsb-release"
    extra = extra_release_files or {}
    if chosen not in DOMESTIC_OS:
        for fname, fid in _RELEASE_FILES:
            if fname in extra:
                chosen, source = fid, fname
                break
    if not chosen:
        chosen = "unknown"
    from_lsb = source == "lsb-release"
    if from_lsb:
        version = lsb.get("DISTRIB_RELEASE", "")
        pretty = lsb.get("DISTRIB_DESCRIPTION", "")
    elif source in {"os-release", "none"}:
        version = osr.get("VERSION_ID", "")
        pretty = osr.get("PRETTY_NAME", "") or osr.get("NAME", "")
    else:
        text = extra.get(source, "").strip().splitlines()
        pretty = text[0] if text else ""
        version = ""
    id_like = osr.get("ID_LIKE", "").lower().split()
    family = "unknown"
    if chosen in _DEB or "debian" in id_like or "ubuntu" in id_like:
        family = "debian"
    elif chosen in _RPM or any(x in id_like for x in ("rhel", "fedora", "centos")):
        family = "rhel"
    elif chosen == "kylin" or chosen == "uos":
        # Kylin Server / UOS Server are RPM based; their desktops are Debian based.
        family = "debian" if (osr_id in _DEB or "desktop" in (pretty + osr.get("NAME", "")).lower()) else "rhel"
    elif chosen != "unknown":
        family = "other"
    name = KNOWN_OS.get(chosen, osr.get("NAME") or chosen)
    return OsInfo(
        id=chosen,
        name=name,
        version_id=version,
        pretty_name=pretty,
        id_like=id_like,
        family=family,
        source=source,
        os_release_id=osr_id,
        lsb_id=lsb_id,
        domestic=chosen in DOMESTIC_OS,
        kernel=kernel,
        kernel_version=kernel_tuple(kernel),
    )
