"""Checks of Herald's own TOML files (users file, accounts file), shared by
the manifest and compose checkers. Mirrors the formats in README.md."""

import tomllib

USER_KEYS = {"jid": True, "password_hash": True, "from": False}
# Exactly the keys of the relay's accounts parser (serde deny_unknown_fields):
# anything else, ca_file included, makes the relay refuse to start. Trust
# anchors are not per account: a private CA goes in SSL_CERT_FILE or
# SSL_CERT_DIR of the process (the README, "Deploying", "Private CA").
ACCOUNT_KEYS = {"jid": True, "password": True, "server": False, "tls": False}


def _check_entries(text, table, keys, where):
    errors = []
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return [f"{where}: not valid TOML: {e}"]
    extra = set(doc) - {table}
    if extra:
        errors.append(f"{where}: unknown top-level keys {sorted(extra)} (only [[{table}]])")
    entries = doc.get(table)
    if not isinstance(entries, list) or not entries:
        return errors + [f"{where}: needs at least one [[{table}]] entry"]
    seen = set()
    for i, entry in enumerate(entries):
        at = f"{where}: [[{table}]] #{i + 1}"
        for key, required in keys.items():
            if required and key not in entry:
                errors.append(f"{at}: missing {key!r}")
        for key, value in entry.items():
            if key not in keys:
                errors.append(f"{at}: unknown key {key!r} (known: {', '.join(keys)})")
            elif not isinstance(value, str):
                errors.append(f"{at}: {key!r} must be a string")
        jid = entry.get("jid")
        if isinstance(jid, str):
            if "@" not in jid or jid.startswith("@") or jid.endswith("@"):
                errors.append(f"{at}: jid {jid!r} is not user@host")
            if jid in seen:
                errors.append(f"{at}: jid {jid!r} listed twice")
            seen.add(jid)
    return errors


def check_users(text, where):
    errors = _check_entries(text, "users", USER_KEYS, where)
    if not errors:
        for i, user in enumerate(tomllib.loads(text)["users"]):
            if not user["password_hash"].startswith("$argon2id$"):
                errors.append(f"{where}: [[users]] #{i + 1}: password_hash is not an argon2id PHC string")
    return errors


def check_accounts(text, where):
    errors = _check_entries(text, "accounts", ACCOUNT_KEYS, where)
    if not errors:
        for i, account in enumerate(tomllib.loads(text)["accounts"]):
            tls = account.get("tls", "required")
            if tls not in ("required", "none"):
                errors.append(f"{where}: [[accounts]] #{i + 1}: tls must be \"required\" or \"none\"")
            server = account.get("server")
            if server is not None and not server.rsplit(":", 1)[-1].isdigit():
                errors.append(f"{where}: [[accounts]] #{i + 1}: server {server!r} is not host:port")
    return errors
