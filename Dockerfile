# syntax=docker/dockerfile:1
# pullcache: build with dev dependencies, run with production ones only, as a non-root user.

FROM node:22-bookworm-slim AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
RUN npm run build

FROM node:22-bookworm-slim AS runtime
# The listen address and storage root come from a config file, not the environment, so that a
# file mounted over /etc/pullcache/config.yaml decides them (the environment beats any file).
ENV NODE_ENV=production \
    PULLCACHE_CONFIG=/etc/pullcache/config.yaml
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts && npm cache clean --force
COPY --from=build /src/dist ./dist
COPY bin ./bin
COPY config ./config
# The status page's files (GET /), read from beside dist/.
COPY static ./static
COPY config/image.yaml /etc/pullcache/config.yaml
RUN groupadd --system pullcache && useradd --system --gid pullcache --home /var/lib/pullcache pullcache \
    && mkdir -p /var/lib/pullcache && chown pullcache:pullcache /var/lib/pullcache
USER pullcache
VOLUME ["/var/lib/pullcache"]
EXPOSE 5000
# GET /readyz on the address in the effective config (PULLCACHE_CONFIG and PULLCACHE_* env).
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/app/bin/healthcheck"]
ENTRYPOINT ["bin/pullcache"]
CMD ["serve"]
