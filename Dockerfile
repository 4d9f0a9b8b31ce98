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
ENV NODE_ENV=production \
    PULLCACHE_SERVER_LISTEN=0.0.0.0:5000 \
    PULLCACHE_STORAGE_FILESYSTEM_ROOT=/var/lib/pullcache
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts && npm cache clean --force
COPY --from=build /src/dist ./dist
COPY bin ./bin
COPY config ./config
RUN groupadd --system pullcache && useradd --system --gid pullcache --home /var/lib/pullcache pullcache \
    && mkdir -p /var/lib/pullcache && chown pullcache:pullcache /var/lib/pullcache
USER pullcache
VOLUME ["/var/lib/pullcache"]
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:5000/readyz').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
ENTRYPOINT ["bin/pullcache"]
CMD ["serve"]
