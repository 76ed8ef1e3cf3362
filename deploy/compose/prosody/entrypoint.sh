#!/bin/sh
# Demo Prosody: a private CA and a server certificate on the /certs volume
# (made once, kept across restarts), the demo accounts, then Prosody in the
# foreground as the prosody user.
set -eu

certs=/certs
mkdir -p "$certs/private"
chmod 0755 "$certs"
chmod 0700 "$certs/private"

if [ ! -s "$certs/ca.pem" ] || [ ! -s "$certs/localhost.crt" ]; then
    echo "prosody-demo: making the demo CA and the certificate for localhost"
    openssl req -x509 -new -nodes -days 3650 \
        -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
        -subj "/CN=Herald compose demo CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$certs/private/ca.key" -out "$certs/ca.pem" 2>/dev/null
    openssl req -new -nodes \
        -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
        -subj "/CN=localhost" \
        -keyout "$certs/localhost.key" -out "$certs/private/localhost.csr" 2>/dev/null
    # The relay checks the certificate against the JID's domain (localhost);
    # "prosody" is the host name it connects to.
    printf '%s\n' \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" \
        "subjectAltName=DNS:localhost,DNS:prosody" > "$certs/private/localhost.ext"
    openssl x509 -req -days 825 -sha256 \
        -in "$certs/private/localhost.csr" \
        -CA "$certs/ca.pem" -CAkey "$certs/private/ca.key" \
        -CAserial "$certs/private/ca.srl" -CAcreateserial \
        -extfile "$certs/private/localhost.ext" \
        -out "$certs/localhost.crt" 2>/dev/null
fi
# The server key is for Prosody only; the CA certificate is for everyone.
chown root:prosody "$certs/localhost.key"
chmod 0640 "$certs/localhost.key"
chmod 0644 "$certs/ca.pem" "$certs/localhost.crt"

mkdir -p /var/lib/prosody
chown -R prosody:prosody /var/lib/prosody
for account in "alice:${ALICE_PASSWORD:?}" "bob:${BOB_PASSWORD:?}"; do
    user=${account%%:*}
    password=${account#*:}
    runuser -u prosody -- prosodyctl register "$user" localhost "$password"
    echo "prosody-demo: account $user@localhost ready"
done

exec runuser -u prosody -- prosody -F
