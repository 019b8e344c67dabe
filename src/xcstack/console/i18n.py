"""The console's words in zh-CN (the default) and English, and how a request picks its language.

The MLPS (等保) names of the three administrators are used as written in the standard.
"""

from __future__ import annotations

from starlette.requests import Request

LANGS = ("zh-CN", "en")
LANG_COOKIE = "xc_lang"

_ZH: dict[str, str] = {
    "title": "xcstack 控制台", "login": "登录", "logout": "退出", "username": "用户名", "password": "密码",
    "totp_code": "动态口令 (TOTP)", "sign_in": "登录", "home": "首页", "profile": "个人信息",
    "sysadmin": "系统管理员", "secadmin": "安全管理员", "auditor": "审计管理员", "user": "用户",
    "overview": "运行概览", "models": "上游与模型", "users": "用户", "roles": "角色", "keys": "API 密钥",
    "groups": "分组", "audit": "审计记录", "chains": "审计链与检查点", "usage": "用量与配额",
    "change_password": "修改密码", "old_password": "当前密码", "new_password": "新密码",
    "repeat_password": "再次输入新密码", "must_change": "首次登录（或密码已过期）：请先修改密码。",
    "totp": "动态口令", "totp_enroll": "绑定动态口令", "totp_start": "开始绑定",
    "totp_scan": "用身份验证器应用扫描二维码（或输入密钥），然后输入应用显示的 6 位口令。",
    "totp_secret": "密钥", "confirm": "确认", "recovery_codes": "恢复码（只显示一次，请妥善保存）",
    "totp_enabled": "动态口令已启用", "totp_required_first": "请先绑定动态口令，之后才能使用控制台。",
    "continue": "继续", "roles_of": "角色", "group": "分组", "kind": "类型", "created": "创建时间",
    "disabled": "已停用", "actions": "操作", "create": "创建", "name": "名称", "days": "有效天数",
    "expires": "到期", "revoke": "吊销", "key_once": "密钥只显示这一次，请立即复制保存：",
    "one_time_pw": "一次性密码（只显示一次，首次登录须修改）：", "disable": "停用", "enable": "启用",
    "reset_password": "重置密码", "reset_totp": "重置动态口令", "set_roles": "设置角色", "save": "保存",
    "filter": "筛选", "since": "起始时间 (UTC)", "until": "截止时间 (UTC)", "actor": "操作者", "action": "动作",
    "outcome": "结果", "request_id": "请求 ID", "resource": "资源", "time": "时间", "detail": "详情",
    "verify": "校验审计链", "verify_ok": "审计链完整：全部校验通过", "verify_bad": "审计链校验失败",
    "break_at": "断点位置", "export_csv": "导出 CSV", "export_jsonl": "导出 JSON Lines", "next": "下一页",
    "chain": "链", "segments": "分段文件", "checkpoints": "检查点", "status": "状态", "health": "健康",
    "circuit": "熔断器", "closed": "关闭（正常）", "open": "打开（已熔断）", "half_open": "半开（探测中）",
    "req_rate": "请求速率 (次/秒)", "p50": "p50 延迟 (ms)", "p99": "p99 延迟 (ms)", "tokens_s": "tokens/秒",
    "errors": "错误 (次/秒)", "loop_lag": "事件循环延迟 (ms)", "capabilities": "能力与后端",
    "upstreams": "上游", "ready": "就绪", "not_ready": "未就绪", "worker": "HTTP 工作进程", "pid": "进程号",
    "cores": "CPU 核", "no_access": "无权访问", "lang_switch": "English", "welcome": "欢迎",
    "your_roles": "你的角色", "none": "无", "quotas": "配额", "period": "周期", "limit": "上限",
    "used": "已用", "tokens": "tokens", "requests": "请求数", "idle_note": "空闲超时后会话自动失效",
    "locked": "失败次数过多，账户已锁定，请稍后再试", "bad_login": "用户名或密码错误",
    "totp_needed": "请输入动态口令", "bad_totp": "动态口令错误或已使用", "error": "错误",
    "csrf": "请求已被拒绝（CSRF 校验失败）", "saved": "已保存", "model": "模型", "owner": "所有者",
    "description": "说明", "builtin": "内置", "allow": "允许", "deny": "拒绝", "seq": "序号",
    "records": "条记录", "api_keys_note": "密钥创建后只显示一次；系统只保存其哈希值。",
    "quota_tokens": "每月 token 配额（可选）", "mismatch": "两次输入的新密码不一致",
}

_EN: dict[str, str] = {
    "title": "xcstack console", "login": "Sign in", "logout": "Sign out", "username": "User name",
    "password": "Password", "totp_code": "TOTP code", "sign_in": "Sign in", "home": "Home", "profile": "Profile",
    "sysadmin": "System administrator", "secadmin": "Security administrator", "auditor": "Audit administrator",
    "user": "User", "overview": "Overview", "models": "Upstreams and models", "users": "Users", "roles": "Roles",
    "keys": "API keys", "groups": "Groups", "audit": "Audit records", "chains": "Chains and checkpoints",
    "usage": "Usage and quotas", "change_password": "Change password", "old_password": "Current password",
    "new_password": "New password", "repeat_password": "Repeat the new password",
    "must_change": "First sign-in (or an expired password): change your password first.",
    "totp": "TOTP", "totp_enroll": "Enrol TOTP", "totp_start": "Start enrolment",
    "totp_scan": "Scan the QR code with an authenticator app (or type the secret), then enter the 6-digit code.",
    "totp_secret": "Secret", "confirm": "Confirm", "recovery_codes": "Recovery codes (shown once: keep them safe)",
    "totp_enabled": "TOTP is enabled", "totp_required_first": "Enrol TOTP before using the console.",
    "continue": "Continue", "roles_of": "Roles", "group": "Group", "kind": "Kind", "created": "Created",
    "disabled": "Disabled", "actions": "Actions", "create": "Create", "name": "Name", "days": "Days valid",
    "expires": "Expires", "revoke": "Revoke", "key_once": "The key is shown this once; copy it now:",
    "one_time_pw": "One-time password (shown once; to change at first sign-in):", "disable": "Disable",
    "enable": "Enable", "reset_password": "Reset password", "reset_totp": "Reset TOTP", "set_roles": "Set roles",
    "save": "Save", "filter": "Filter", "since": "Since (UTC)", "until": "Until (UTC)", "actor": "Actor",
    "action": "Action", "outcome": "Outcome", "request_id": "Request id", "resource": "Resource", "time": "Time",
    "detail": "Detail", "verify": "Verify the chain", "verify_ok": "Audit chain intact: every check passed",
    "verify_bad": "Audit chain verification FAILED", "break_at": "Break at", "export_csv": "Export CSV",
    "export_jsonl": "Export JSON Lines", "next": "Next page", "chain": "Chain", "segments": "Segments",
    "checkpoints": "Checkpoints", "status": "Status", "health": "Health", "circuit": "Circuit breaker",
    "closed": "closed (healthy)", "open": "open (tripped)", "half_open": "half-open (probing)",
    "req_rate": "Requests/s", "p50": "p50 latency (ms)", "p99": "p99 latency (ms)", "tokens_s": "Tokens/s",
    "errors": "Errors/s", "loop_lag": "Event-loop lag (ms)", "capabilities": "Capabilities and backends",
    "upstreams": "Upstreams", "ready": "ready", "not_ready": "not ready", "worker": "HTTP worker", "pid": "PID",
    "cores": "CPU cores", "no_access": "No access", "lang_switch": "中文", "welcome": "Welcome",
    "your_roles": "Your roles", "none": "none", "quotas": "Quotas", "period": "Period", "limit": "Limit",
    "used": "Used", "tokens": "tokens", "requests": "requests", "idle_note": "The session ends after idle time",
    "locked": "Too many failed attempts: the account is locked, try again later",
    "bad_login": "Wrong user name or password", "totp_needed": "Enter your TOTP code",
    "bad_totp": "Wrong or already used TOTP code", "error": "Error",
    "csrf": "Request refused (CSRF check failed)", "saved": "Saved", "model": "Model", "owner": "Owner",
    "description": "Description", "builtin": "built-in", "allow": "Allow", "deny": "Deny", "seq": "Seq",
    "records": "records", "api_keys_note": "A key is shown once when created; only its hash is stored.",
    "quota_tokens": "Monthly token quota (optional)", "mismatch": "The two new passwords differ",
}

# the system administrator's further pages, the security administrator's pages, own keys
_ZH.update({
    "vectors": "向量集合", "db": "命名查询", "jobs": "异步任务", "crypto_keys": "国密密钥", "playground": "调试台",
    "dimension": "维度", "metric": "距离度量", "rows": "行", "index": "索引", "search_text": "检索文本",
    "search_vector": "或向量", "search": "检索", "score": "得分", "database": "数据库", "queries": "查询",
    "read_only": "只读", "transaction": "事务", "required": "必填", "run": "运行", "truncated": "已截断",
    "finished": "完成时间", "cancel": "取消", "jobs_note": "列出当前登录身份提交的任务。",
    "algorithm": "算法", "version": "版本", "versions": "版本数", "no_public_part": "对称密钥：无公钥部分",
    "crypto_note": ("只显示密钥的元数据与公钥，从不显示密钥材料。"
                    "轮换生成新版本，之后用新版本签名和加密；旧版本仍可用于验签和解密。"),
    "rotate": "轮换", "rotated": "已轮换：新版本已生成",
    "play_chat": "对话", "play_embeddings": "向量化", "play_rerank": "重排序", "play_input": "输入（重排序时为查询）",
    "play_documents": "待重排序的文档（每行一篇）", "answer": "回答", "document": "文档",
    "security": "安全策略与会话", "safety": "内容安全", "locked_accounts": "已锁定账户", "locked_for": "剩余锁定 (秒)",
    "unlock": "解锁", "sessions": "会话", "last_seen": "最近活动", "restricted": "受限", "end_session": "结束会话",
    "secrets": "机密（只显示名称）", "updated": "更新时间", "policies": "策略", "lists": "词表", "categories": "类别",
    "size": "大小", "entries": "条目", "my_keys": "我的 API 密钥",
})
_EN.update({
    "vectors": "Vector collections", "db": "Named queries", "jobs": "Async jobs", "crypto_keys": "国密 keys",
    "playground": "Playground", "dimension": "Dimension", "metric": "Metric", "rows": "rows", "index": "Index",
    "search_text": "Search text", "search_vector": "or a vector", "search": "Search", "score": "Score",
    "database": "Database", "queries": "Queries", "read_only": "Read-only", "transaction": "Transaction",
    "required": "required", "run": "Run", "truncated": "truncated", "finished": "Finished", "cancel": "Cancel",
    "jobs_note": "The jobs submitted by the signed-in identity.", "algorithm": "Algorithm", "version": "Version",
    "versions": "Versions", "no_public_part": "A symmetric key: no public part",
    "crypto_note": "Metadata and public keys only, never key material. Rotating makes a new version that signs "
                   "and encrypts from then on; older versions still verify and decrypt.",
    "rotate": "Rotate", "rotated": "Rotated: a new version was made",
    "play_chat": "Chat", "play_embeddings": "Embeddings", "play_rerank": "Rerank",
    "play_input": "Input (the query for rerank)", "play_documents": "Documents to rerank (one per line)",
    "answer": "Answer", "document": "Document", "security": "Security policy and sessions", "safety": "Content safety",
    "locked_accounts": "Locked accounts", "locked_for": "Locked for (s)", "unlock": "Unlock", "sessions": "Sessions",
    "last_seen": "Last seen", "restricted": "Restricted", "end_session": "End session",
    "secrets": "Secrets (names only)", "updated": "Updated", "policies": "Policies", "lists": "Lists",
    "categories": "Categories", "size": "Size", "entries": "Entries", "my_keys": "My API keys",
})

# key rotation, sessions, content safety, own keys
_ZH.update({
    "sessions_note": "当前有效的会话（不显示令牌）。结束会话后，该会话的 Cookie 或令牌立即失效。",
    "this_session": "当前会话", "session_ended": "会话已结束", "on": "启用", "off": "关闭",
    "safety_note": ("只读：策略与词表在配置文件中修改（SIGHUP 重新加载）；"
                    "词表只显示名称、类别、哈希与词数，从不显示词条。"),
    "mask_char": "掩码字符", "evidence_key": "证据密钥", "selectors": "适用范围", "input_detectors": "输入检测",
    "output_detectors": "输出检测", "any": "全部请求", "unused": "未被策略使用", "labels": "内容标识",
    "label_no_crypto": "密码服务未启用，未签名", "sign_key": "签名密钥", "explicit_label": "显式标识",
    "in_answer": "附加在回答中",
    "my_keys_note": ("为自己签发 API 密钥：只能带有你已有的角色（管理员角色除外），"
                     "有效期受系统上限约束；密钥只显示一次。"),
    "revoked": "已吊销",
})
_EN.update({
    "sessions_note": "The active sessions (never a token). Ending one makes its cookie or token stop working at once.",
    "this_session": "this session", "session_ended": "Session ended", "on": "on", "off": "off",
    "safety_note": "Read-only: policies and lists change in the config file (SIGHUP reloads them); a list shows its "
                   "name, category, hash and word count, never its words.",
    "mask_char": "Mask character", "evidence_key": "Evidence key", "selectors": "Applies to",
    "input_detectors": "Input detectors", "output_detectors": "Output detectors", "any": "every request",
    "unused": "not used by a policy", "labels": "Content labels", "label_no_crypto": "crypto is off: not signed",
    "sign_key": "Signing key", "explicit_label": "Explicit label", "in_answer": "appended to answers",
    "my_keys_note": "Issue API keys for yourself: only roles you hold (not an administrator role), expiry bounded "
                    "by the system's limit; a key is shown once.",
    "revoked": "revoked",
})

# the overview's process tree (GET /v1/system/processes)
_ZH.update({
    "processes": "进程与 CPU 核", "process": "进程", "threads": "线程", "restarts": "重启次数", "uptime": "运行时长",
    "last_exit": "上次退出码", "cpu_count": "本机 CPU 数", "io_cores": "I/O 核", "compute_cores": "计算核",
    "llm_cores": "大模型核", "pinned": "绑核", "event_loop": "事件循环", "unpinned": "未绑核",
    "this_worker": "应答本页的进程", "supervisor_process": "主控进程 (supervisor)",
    "no_supervisor": "未找到主控进程的进程表，只显示当前进程", "state_starting": "启动中", "state_running": "运行中",
    "state_restarting": "重启中", "state_stopped": "已停止",
    "kind_http": "HTTP 工作进程", "kind_model-worker": "模型工作进程 (ONNX Runtime)",
    "kind_llm-worker": "大模型工作进程 (llama.cpp)", "kind_hsm-owner": "密码设备属主进程",
    "kind_milvus-lite": "向量引擎 (Milvus Lite)",
})
_EN.update({
    "processes": "Processes and cores", "process": "Process", "threads": "Threads", "restarts": "Restarts",
    "uptime": "Uptime", "last_exit": "last exit", "cpu_count": "CPUs on this machine", "io_cores": "I/O cores",
    "compute_cores": "compute cores", "llm_cores": "LLM cores", "pinned": "pinned", "event_loop": "event loop",
    "unpinned": "not pinned", "this_worker": "answered this page", "supervisor_process": "Supervisor",
    "no_supervisor": "No supervisor's process table: this process only", "state_starting": "starting",
    "state_running": "running", "state_restarting": "restarting", "state_stopped": "stopped",
    "kind_http": "HTTP worker", "kind_model-worker": "Model worker (ONNX Runtime)",
    "kind_llm-worker": "LLM worker (llama.cpp)", "kind_hsm-owner": "HSM owner",
    "kind_milvus-lite": "Vector engine (Milvus Lite)",
})

STRINGS = {"zh-CN": _ZH, "en": _EN}


def pick_language(request: Request, default: str) -> str:
    """The switch (`?lang=`, then its cookie) wins; else the first of Accept-Language we speak; else default."""
    for value in (request.query_params.get("lang"), request.cookies.get(LANG_COOKIE)):
        if value in LANGS:
            return value
    for part in request.headers.get("accept-language", "").split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("zh"):
            return "zh-CN"
        if tag.startswith("en"):
            return "en"
    return default


def translator(lang: str) -> dict[str, str]:
    return STRINGS.get(lang, _ZH)
