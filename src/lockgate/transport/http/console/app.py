"""The governance console at ``/console``: pages for the people who approve models.

Every page reads and every form acts through the admin servicer's own methods
(``AdminService.call`` with the session's principal), so a person in the browser passes the
same role checks, four-eyes rule and audit as the CLI and the admin API; refusals are shown
with the API's message and its HTTP status. Pages are rendered on the server (Jinja2, auto-
escaped); the only script refreshes the traffic page from ``/console/api/traffic/{model}``.
Assets ship in the package (no CDN), so the console works offline.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import time
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Any, Awaitable, Callable

from jinja2 import Environment, PackageLoader, select_autoescape

from lockgate._proto.lockgate import admin_pb2 as pb
from lockgate.control.auth import Authenticator
from lockgate.errors import InvalidArgument, LockgateError, NotFound
from lockgate.serving.repository import ModelRepository
from lockgate.transport import model_info
from lockgate.transport.grpc.admin import AdminService
from lockgate.transport.http.console import charts
from lockgate.transport.http.console.session import Session, SessionSigner
from lockgate.transport.http.messages import HttpRequest, HttpResponse
from lockgate.transport.http.status import http_status

log = logging.getLogger("lockgate.console")

PREFIX = "/console"
HTML = "text/html; charset=utf-8"
PENDING_STATES = ("validated",)
#: Headers every console page carries: no framing, no sniffing, no third-party anything.
SECURITY_HEADERS = [
    ("content-security-policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                                "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),  # "no-referrer" would make browsers send Origin: null
    ("cache-control", "no-store"),
]


class Console:
    def __init__(self, admin: AdminService, auth: Authenticator, repository: ModelRepository, *,
                 session_key: bytes, secure_cookies: bool, state_dir: Path, model_repository: Path) -> None:
        self.admin = admin
        self.auth = auth
        self.repository = repository
        self.state_dir = Path(state_dir)
        self.model_repository = Path(model_repository)
        self.sessions = SessionSigner(session_key, secure=secure_cookies)
        self.templates = Environment(loader=PackageLoader("lockgate.transport.http.console", "templates"),
                                     autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
        self.templates.filters["when"] = _when
        self.templates.filters["pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)

    # ------------------------------------------------------------------ dispatch
    async def handle(self, request: HttpRequest) -> HttpResponse | None:
        path = request.path
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            return None
        parts = [urllib.parse.unquote(p) for p in path[len(PREFIX):].strip("/").split("/") if p]
        if parts[:1] == ["static"] and len(parts) == 2:
            return self._static(parts[1])
        if parts == ["login"]:
            return await self._login(request) if request.method == "POST" else self._login_page(request)
        session = self.sessions.read(request.header("cookie"))
        if session is None:
            if parts[:1] == ["api"]:
                return HttpResponse(401, b'{"error": "sign in first"}')
            return _redirect(f"{PREFIX}/login")
        if request.method == "POST":
            if not self.sessions.check_csrf(session, _form(request).get("csrf")) or not _same_origin(request):
                return self._page(request, session, "error.html", status=403, title="Refused",
                                  error="the form's CSRF token is missing or wrong; reload the page and try again")
        route = self._route(request.method, parts)
        if route is None:
            return self._page(request, session, "error.html", status=404, title="Not found",
                              error=f"no console page at {path}")
        try:
            return await route(request, session, *parts)
        except LockgateError as exc:
            return self._page(request, session, "error.html", status=http_status(exc), title="Refused", error=exc.message)

    def _route(self, method: str, parts: list[str]) -> Callable[..., Awaitable[HttpResponse]] | None:
        n = len(parts)
        if method == "GET":
            if n == 0 or parts == ["models"]:
                return lambda r, s, *a: self.models_page(r, s)
            if n == 4 and parts[0] == "models" and parts[2] == "versions":
                return lambda r, s, *a: self.version_page(r, s, parts[1], parts[3])
            if parts == ["approvals"]:
                return lambda r, s, *a: self.approvals_page(r, s)
            if n == 2 and parts[0] == "traffic":
                return lambda r, s, *a: self.traffic_page(r, s, parts[1])
            if n == 3 and parts[:2] == ["api", "traffic"]:
                return lambda r, s, *a: self.traffic_api(r, s, parts[2])
            if n == 2 and parts[0] == "drift":
                return lambda r, s, *a: self.drift_page(r, s, parts[1])
            if parts == ["audit"]:
                return lambda r, s, *a: self.audit_page(r, s)
            if parts == ["audit", "export"]:
                return lambda r, s, *a: self.audit_export(r, s)
        if method == "POST":
            if parts == ["logout"]:
                return lambda r, s, *a: self._logout()
            if n == 5 and parts[0] == "models" and parts[2] == "versions" and parts[4] == "decision":
                return lambda r, s, *a: self.decide(r, s, parts[1], parts[3])
            if n == 3 and parts[0] == "traffic" and parts[2] == "weights":
                return lambda r, s, *a: self.set_weights(r, s, parts[1])
        return None

    async def _call(self, session: Session, method: str, request: Any) -> dict[str, Any]:
        return model_info.to_json(await self.admin.call(method, request, principal=session.principal))

    # ------------------------------------------------------------------ sign in / out
    def _login_page(self, request: HttpRequest, error: str = "", status: int = 200) -> HttpResponse:
        nonce, cookie = self.sessions.login_token()
        body = self.templates.get_template("login.html").render(csrf=nonce, error=error, session=None, title="Sign in")
        return HttpResponse(status, body.encode(), HTML, [*SECURITY_HEADERS, ("set-cookie", cookie)])

    async def _login(self, request: HttpRequest) -> HttpResponse:
        form = _form(request)
        if not self.sessions.check_login(request.header("cookie"), form.get("csrf")) or not _same_origin(request):
            return self._login_page(request, "the sign-in form expired; please try again", 403)
        token = form.get("token", "").strip()
        try:
            principal = self.auth.authenticate(f"Bearer {token}")
        except LockgateError as exc:
            log.info("console sign-in refused: %s", exc.message)  # never the token
            return self._login_page(request, exc.message, http_status(exc))
        _session, cookie = self.sessions.issue(principal)
        log.info("console sign-in: %s (%s)", principal.name, principal.role.value)
        return _redirect(f"{PREFIX}/models", [("set-cookie", cookie)])

    async def _logout(self) -> HttpResponse:
        return _redirect(f"{PREFIX}/login", [("set-cookie", self.sessions.clear())])

    # ------------------------------------------------------------------ pages
    async def models_page(self, request: HttpRequest, session: Session) -> HttpResponse:
        listed = await self._call(session, "ListVersions", pb.ListVersionsRequest())
        models: dict[str, list[dict[str, Any]]] = {}
        for version in listed.get("versions", []):
            models.setdefault(version["model"], []).append(version)
        for versions in models.values():
            versions.sort(key=lambda v: int(v["version"]) if v["version"].isdigit() else 0)
        return self._page(request, session, "models.html", title="Models", models=dict(sorted(models.items())))

    async def version_page(self, request: HttpRequest, session: Session, model: str, version: str,
                           error: str = "", status: int = 200) -> HttpResponse:
        shown = await self._call(session, "ShowVersion", pb.ShowVersionRequest(model=model, version=version))
        details = json.loads(shown.get("details_json") or "{}")
        reports = details.get("validation_reports", [])
        cards = details.get("cards", [])
        return self._page(
            request, session, "version.html", status=status, title=f"{model} version {version}", error=error,
            info=shown["version"], report=reports[-1] if reports else None, reports=reports,
            card=cards[-1] if cards else None, approvals=details.get("approvals", []),
            pending=shown["version"]["state"] in PENDING_STATES, done=_query(request).get("done", ""),
        )

    async def decide(self, request: HttpRequest, session: Session, model: str, version: str) -> HttpResponse:
        form = _form(request)
        action, reason = form.get("action", ""), form.get("reason", "")
        try:
            if action == "approve":
                await self.admin.call("ApproveVersion", pb.ApproveVersionRequest(model=model, version=version, reason=reason),
                                      principal=session.principal)
            elif action == "reject":
                await self.admin.call("RejectVersion", pb.RejectVersionRequest(model=model, version=version, reason=reason),
                                      principal=session.principal)
            else:
                raise InvalidArgument("choose approve or reject")
        except LockgateError as exc:
            return await self.version_page(request, session, model, version, error=exc.message, status=http_status(exc))
        where = f"{PREFIX}/models/{_q(model)}/versions/{_q(version)}?done={'approved' if action == 'approve' else 'rejected'}"
        return _redirect(where)

    async def approvals_page(self, request: HttpRequest, session: Session) -> HttpResponse:
        listed = await self._call(session, "ListVersions", pb.ListVersionsRequest())
        pending = [v for v in listed.get("versions", []) if v["state"] in PENDING_STATES]
        return self._page(request, session, "approvals.html", title="Pending approvals", pending=pending)

    async def _traffic(self, session: Session, model: str) -> dict[str, Any]:
        status = await self._call(session, "GetTraffic", pb.GetTrafficRequest(model=model))
        canary = status.get("canary")
        verdicts: list[dict[str, Any]] = []
        if canary is not None:
            canary["guardrails"] = json.loads(canary.get("guardrails_json") or "{}")
            log_entries = await self._call(session, "AuditLog", pb.AuditLogRequest(model=model, limit=200))
            for entry in reversed(log_entries.get("entries", [])):
                details = json.loads(entry.get("details_json") or "{}")
                if entry["action"].startswith("traffic.canary") and isinstance(details.get("guardrails"), list):
                    verdicts = details["guardrails"]
                    canary["last_analysis"] = {"action": entry["action"], "time": entry["time"],
                                               "outcome": details.get("outcome")}
                    break
            canary["verdicts"] = verdicts
        total = sum(w["weight"] for w in status.get("weights", [])) or 1
        for weight in status.get("weights", []):
            weight["share"] = round(100.0 * weight["weight"] / total, 1)
        return status

    async def traffic_page(self, request: HttpRequest, session: Session, model: str, error: str = "",
                           status_code: int = 200) -> HttpResponse:
        status = await self._traffic(session, model)
        listed = await self._call(session, "ListVersions", pb.ListVersionsRequest(model=model))
        return self._page(request, session, "traffic.html", status=status_code, title=f"Traffic: {model}", model=model,
                          traffic=status, versions=listed.get("versions", []), error=error,
                          done=_query(request).get("done", ""))

    async def traffic_api(self, request: HttpRequest, session: Session, model: str) -> HttpResponse:
        status = await self._traffic(session, model)
        return HttpResponse(200, json.dumps(status, default=str).encode(), "application/json", list(SECURITY_HEADERS))

    async def set_weights(self, request: HttpRequest, session: Session, model: str) -> HttpResponse:
        form = _form(request)
        weights: dict[str, int] = {}
        try:
            for key, value in form.items():
                if key.startswith("weight-") and value.strip():
                    weights[key[len("weight-"):]] = int(value)
            message = pb.SetWeightsRequest(model=model, weights=weights)
            if "sticky" in form:
                message.sticky = form.get("sticky") == "on"
            await self.admin.call("SetWeights", message, principal=session.principal)
        except ValueError:
            return await self.traffic_page(request, session, model, "weights must be whole numbers", 400)
        except LockgateError as exc:
            return await self.traffic_page(request, session, model, exc.message, http_status(exc))
        return _redirect(f"{PREFIX}/traffic/{_q(model)}?done=weights")

    async def drift_page(self, request: HttpRequest, session: Session, model: str) -> HttpResponse:
        await self._call(session, "WhoAmI", pb.WhoAmIRequest())  # the read permission, as every page
        from lockgate.governance.report import evaluation_basis, summary_row, versions_with_windows, window_history

        loaded = self.repository.models().get(model)
        versions = versions_with_windows(self.state_dir, model)
        if loaded is None and not versions:
            raise NotFound(f"model {model!r} is not loaded and has no drift windows")
        sections = []
        for version in versions:
            try:  # the report's evaluation (profile, drift config, class names), with the config serving runs
                basis = evaluation_basis(self.model_repository, model, version, loaded.config if loaded else None)
                history = window_history(self.model_repository, self.state_dir, model, version, last=30, basis=basis)
            except (FileNotFoundError, ValueError) as exc:
                sections.append({"version": version, "error": str(exc), "windows": []})
                continue
            latest = history[-1] if history else None
            sections.append({
                "version": version, "error": "", "windows": history, "latest": latest,
                "summary": [summary_row(f) for f in (latest.features if latest else [])],
                "chart": charts.psi_over_windows(history, title=f"PSI per window, {model} version {version}"),
                "bins": [(f, charts.bins_svg(f)) for f in (latest.features if latest else []) if f.index >= 0][:12],
            })
        return self._page(request, session, "drift.html", title=f"Drift: {model}", model=model, sections=sections)

    async def audit_page(self, request: HttpRequest, session: Session) -> HttpResponse:
        query = _query(request)
        model, action, actor, since = (query.get(k, "").strip() for k in ("model", "action", "actor", "since"))
        limit = min(max(int(query.get("limit", "200") or 200), 1), 2000) if query.get("limit", "200").isdigit() else 200
        entries = (await self._call(session, "AuditLog", pb.AuditLogRequest(model=model, since=since, limit=0))).get("entries", [])
        if action:
            entries = [e for e in entries if action in e["action"]]
        if actor:
            entries = [e for e in entries if e["actor"] == actor]
        entries = entries[-limit:][::-1]  # newest first
        for entry in entries:
            entry["details"] = json.loads(entry.get("details_json") or "{}")
        verified = await self._call(session, "AuditVerify", pb.AuditVerifyRequest())
        return self._page(request, session, "audit.html", title="Audit trail", entries=entries, verify=verified,
                          filters={"model": model, "action": action, "actor": actor, "since": since, "limit": limit})

    async def audit_export(self, request: HttpRequest, session: Session) -> HttpResponse:
        model = _query(request).get("model", "").strip()
        if not model:
            raise InvalidArgument("name the model whose evidence to export")
        bundle = await self._call(session, "AuditExport", pb.AuditExportRequest(model=model))
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
        headers = [*SECURITY_HEADERS, ("content-disposition", f'attachment; filename="lockgate-evidence-{name}.json"')]
        return HttpResponse(200, bundle["bundle_json"].encode(), "application/json", headers)

    # ------------------------------------------------------------------ plumbing
    def _page(self, request: HttpRequest, session: Session | None, template: str, *, status: int = 200,
              **context: Any) -> HttpResponse:
        csrf = self.sessions.csrf_token(session) if session is not None else ""
        body = self.templates.get_template(template).render(session=session, csrf=csrf, prefix=PREFIX,
                                                            path=request.path, **context)
        return HttpResponse(status, body.encode(), HTML, list(SECURITY_HEADERS))

    def _static(self, name: str) -> HttpResponse:
        folder = resources.files("lockgate.transport.http.console") / "static"
        item = folder / name
        if "/" in name or name.startswith(".") or not item.is_file():
            return HttpResponse(404, b"not found", "text/plain")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return HttpResponse(200, item.read_bytes(), kind, [("cache-control", "max-age=3600"),
                                                           ("x-content-type-options", "nosniff")])


def _form(request: HttpRequest) -> dict[str, str]:
    if request.method != "POST":
        return {}
    try:
        text = request.body.decode("utf-8")
    except UnicodeDecodeError:
        return {}
    return dict(urllib.parse.parse_qsl(text, keep_blank_values=True))


def _query(request: HttpRequest) -> dict[str, str]:
    return {k: v for k, v in urllib.parse.parse_qsl(request.query, keep_blank_values=True)}


def _same_origin(request: HttpRequest) -> bool:
    """A browser's Origin (when sent) must be this server: forms from other sites are refused."""
    origin = request.header("origin")
    if not origin or origin == "null":
        return origin is None
    host = request.header("host") or ""
    return urllib.parse.urlsplit(origin).netloc == host


def _redirect(location: str, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    return HttpResponse(303, b"", "text/plain", [("location", location), *(headers or []), *SECURITY_HEADERS])


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _when(value: Any) -> str:
    if isinstance(value, (int, float)) and value > 0:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
    return str(value or "")


__all__ = ["Console"]
