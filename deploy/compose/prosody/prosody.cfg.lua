-- Prosody for Herald's compose stack. Demo only: fixed passwords, no s2s.
-- The XMPP domain is "localhost"; other containers reach the server as
-- "prosody" (port 5222), the host as 127.0.0.1:15222.

pidfile = "/var/lib/prosody/prosody.pid"
data_path = "/var/lib/prosody"
log = { { levels = { min = "info" }, to = "console" } }

interfaces = { "*" }
c2s_ports = { 5222 }
c2s_direct_tls_ports = {}
legacy_ssl_ports = {}
s2s_ports = {}
http_ports = {}
https_ports = {}

modules_enabled = {
    "roster"; "saslauth"; "tls"; "disco"; "ping";
    -- XEP-0198: the relay acks a job only after the server acked the stanza.
    "smacks";
    -- keep bob's messages until he logs in
    "offline";
}
modules_disabled = { "s2s" }

authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = true
allow_unencrypted_plain_auth = false
-- Send each stanza at once instead of holding it (Nagle's algorithm) until the
-- client acks the previous one: see "The XMPP server" in the README.
network_settings = { nagle = false }

-- Made by the entrypoint, signed by the demo CA in /certs/ca.pem.
VirtualHost "localhost"
    ssl = {
        certificate = "/certs/localhost.crt";
        key = "/certs/localhost.key";
    }
