"""The dashboard's sign-in: ``GET /login`` (a form), ``POST /login`` (a token in, a session cookie out) and
``POST /logout``.

The cookie is HttpOnly, SameSite=Strict, Secure (and ``__Host-`` prefixed) over https, and lasts as long as
its session (``fleet.auth.SESSION_TTL_S``); it only ever reads (``fleet.auth``). Both forms are public
routes: ``fleet.guard`` still checks their Host, their Origin and their body's type and size.
"""

from __future__ import annotations

from html import escape as e
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from fleet.auth import FORM, PUBLIC, Auth, allow
from fleet.guard import cookie_name, session_value
from fleet.pages import layout


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this controller only (never ``//elsewhere``)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")) or any(
            c in target for c in "\r\n\t"):
        return "/"
    return target


def login_page(next_path: str, error: str = "") -> str:
    message = f'<p class="bad-text">{e(error)}</p>' if error else ""
    body = f"""<section class="panel login"><h1>Sign in</h1>
<p>Paste a token of this controller: one from <code>edgefleet fleet token create --role read</code>, or the
first admin token in the controller's data dir (<code>admin.token</code>). Whatever the token's role, the
dashboard only reads; changes are made with the token itself (the CLI or the API).</p>
{message}
<form method="post" action="/login">
<input type="hidden" name="next" value="{e(next_path)}">
<label for="token">Token</label>
<input type="password" id="token" name="token" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
</form></section>"""
    return layout("Sign in", body, bare=True)


def _cookie(request: Request, value: str, max_age: int) -> str:
    parts = [f"{cookie_name(request.url.scheme)}={value}", "Path=/", "HttpOnly", "SameSite=Strict",
             f"Max-Age={max_age}"]
    if request.url.scheme == "https":
        parts.append("Secure")
    return "; ".join(parts)


def routes(auth: Auth) -> list[Route]:
    async def login(request: Request) -> Response:
        if request.method == "GET":
            return HTMLResponse(login_page(safe_next(request.query_params.get("next"))))
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        next_path = safe_next((form.get("next") or ["/"])[0])
        caller = await run_in_threadpool(auth.check_token, token) if token else None
        if caller is None:
            return HTMLResponse(login_page(next_path, "That is not a valid token (or it was revoked)."),
                                status_code=401, headers={"WWW-Authenticate": 'Bearer realm="edgefleet"'})
        value = await run_in_threadpool(auth.open_session, caller)
        await run_in_threadpool(lambda: auth.audit(caller.name, "login", "dashboard", "a read-only session",
                                                   status=303, remote=request.client.host if request.client else ""))
        response = RedirectResponse(next_path, status_code=303)
        response.headers.append("Set-Cookie", _cookie(request, value, int(auth.session_ttl_s)))
        return response

    async def logout(request: Request) -> Response:
        await run_in_threadpool(auth.end_session, session_value(request.scope))
        response = RedirectResponse("/login", status_code=303)
        response.headers.append("Set-Cookie", _cookie(request, "", 0))
        return response

    return [allow(Route("/login", login, methods=["GET", "POST"]), PUBLIC, body=FORM),
            allow(Route("/logout", logout, methods=["POST"]), PUBLIC, body=FORM)]
