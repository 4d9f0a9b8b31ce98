/* global document, window, fetch, performance */
/**
 * The status page: polls GET /_pullcache/v1/status (every 2 s, every second while blobs are
 * being fetched) and the admin API's images (when the cache changed, and every 30 s), and draws
 * them with the DOM alone. The image list renders only the rows in view, so 10,000 images
 * scroll as 20 do. Text from the server only ever goes into textContent.
 */
const API = '/_pullcache/v1';
const ROW_HEIGHT = 32;
const POLL_MS = 2000;
const POLL_FETCHING_MS = 1000;
const IMAGES_EVERY_MS = 30_000;

const $ = (id) => document.getElementById(id);

// ---- formatting -------------------------------------------------------------------------

function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

function percent(ratio) {
  return ratio === null || ratio === undefined ? '–' : `${(ratio * 100).toFixed(1)}%`;
}

function ago(iso, now = Date.now()) {
  if (!iso) return 'never';
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function duration(seconds) {
  const d = Math.floor(seconds / 86400);
  const h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  return d > 0 ? `${d} d ${h} h` : h > 0 ? `${h} h ${m} min` : `${m} min`;
}

/** An element with a class and text; children appended. */
function el(tag, className, text, ...children) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const c of children) e.append(c);
  return e;
}

function setValue(id, value, text) {
  const e = $(id);
  e.dataset.value = value === null || value === undefined ? '' : String(value);
  e.textContent = text;
}

// ---- the overview -------------------------------------------------------------------------

function renderTraffic(status) {
  const t = status.traffic;
  setValue('hit-ratio-requests', t.hitRatio.requests, percent(t.hitRatio.requests));
  setValue('hit-ratio-bytes', t.hitRatio.bytes, percent(t.hitRatio.bytes));
  setValue('hits', t.hits, t.hits.toLocaleString('en'));
  setValue('misses', t.misses, t.misses.toLocaleString('en'));
  setValue('served-bytes', t.servedBytes, bytes(t.servedBytes));
  setValue('saved-bytes', t.savedBytes, bytes(t.savedBytes));
  setValue('upstream-bytes', t.upstreamBytes, bytes(t.upstreamBytes));
}

function renderStorage(s) {
  setValue('storage-used', s.bytes, bytes(s.bytes));
  const bar = $('storage-bar');
  const share = s.maxSize > 0 ? Math.min(1, s.bytes / s.maxSize) : 0;
  bar.firstElementChild.style.width = `${(share * 100).toFixed(1)}%`;
  bar.classList.toggle('full', share >= 0.9);
  bar.setAttribute('aria-valuenow', String(Math.round(share * 100)));
  const parts = [
    s.maxSize > 0 ? `of ${bytes(s.maxSize)} budget (${Math.round(share * 100)}%)` : 'no budget',
    `${s.images.toLocaleString('en')} images`,
    s.free === null ? null : `${bytes(s.free)} free on disk`,
    s.ready ? null : 'counting…',
  ];
  $('storage-detail').textContent = parts.filter(Boolean).join(' · ');
}

const SVG = 'http://www.w3.org/2000/svg';

function svg(tag, attributes) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attributes)) e.setAttribute(k, String(v));
  return e;
}

/** Bytes per interval (hit and miss, stacked) and the hit ratio by requests, over the hour. */
function renderChart(history, now) {
  const W = 600;
  const H = 120;
  const span = 3600_000;
  const points = history.points;
  const chart = svg('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none' });
  const bars = [];
  for (let i = 1; i < points.length; i++) {
    const a = points[i - 1];
    const b = points[i];
    const hit = b.hitBytes - a.hitBytes;
    const miss = b.missBytes - a.missBytes;
    const requests = b.hits - a.hits + (b.misses - a.misses);
    bars.push({
      from: a.t,
      to: b.t,
      hit,
      miss,
      ratio: requests > 0 ? (b.hits - a.hits) / requests : null,
    });
  }
  // Per second, so that the partial interval at the end does not look like a drop.
  const rate = (bar, n) => (n * 1000) / Math.max(bar.to - bar.from, 1);
  const max = Math.max(1, ...bars.map((bar) => rate(bar, bar.hit + bar.miss)));
  const x = (t) => ((t - (now - span)) / span) * W;
  const plot = H - 1;
  for (const bar of bars) {
    if (bar.to < now - span) continue;
    const left = Math.max(0, x(bar.from));
    const width = Math.max(1, x(bar.to) - left - 0.5);
    const hitH = (rate(bar, bar.hit) / max) * plot;
    const missH = (rate(bar, bar.miss) / max) * plot;
    if (missH > 0)
      chart.append(
        svg('rect', { x: left, y: plot - missH, width, height: missH, fill: 'var(--miss)' }),
      );
    if (hitH > 0)
      chart.append(
        svg('rect', {
          x: left,
          y: plot - missH - hitH,
          width,
          height: hitH,
          fill: 'var(--hit)',
        }),
      );
  }
  const line = bars
    .filter((bar) => bar.ratio !== null && bar.to >= now - span)
    .map((bar) => `${x(bar.to).toFixed(1)},${(plot - bar.ratio * plot).toFixed(1)}`);
  if (line.length > 1)
    chart.append(
      svg('polyline', {
        points: line.join(' '),
        fill: 'none',
        stroke: 'var(--ratio)',
        'stroke-width': 1.5,
        'vector-effect': 'non-scaling-stroke',
      }),
    );
  $('chart-peak').textContent = `peak ${bytes(max)}/s`;
  $('chart').replaceChildren(chart);
}

function renderUpstreams(upstreams) {
  const rows = upstreams.map((u) => {
    const limit = u.rateLimit
      ? `${u.rateLimit.remaining ?? '?'} of ${u.rateLimit.limit ?? '?'}`
      : 'not reported';
    const failure = u.lastFailure
      ? `${ago(u.lastFailure.at)}: ${u.lastFailure.what}: ${u.lastFailure.reason}`
      : '';
    const tr = el(
      'tr',
      'upstream',
      undefined,
      el('td', 'name', u.name),
      el('td', '', undefined, el('span', `badge ${u.state}`, u.state)),
      el('td', '', u.auth ?? '–'),
      el('td', '', u.latencyMs === null ? '–' : `${u.latencyMs} ms`),
      el('td', 'limit', limit),
      el('td', 'small', failure),
    );
    tr.dataset.upstream = u.name;
    return tr;
  });
  $('upstreams').tBodies[0].replaceChildren(...rows);
}

function renderFetches(fetches) {
  $('fetch-count').textContent = String(fetches.length);
  if (fetches.length === 0) {
    $('fetches').replaceChildren(el('p', 'empty', 'Nothing is being fetched.'));
    return;
  }
  $('fetches').replaceChildren(
    ...fetches.map((f) => {
      const share = f.size ? f.received / f.size : 0;
      const bar = el('div', 'bar', undefined, el('div'));
      bar.firstElementChild.style.width = `${(share * 100).toFixed(1)}%`;
      bar.setAttribute('role', 'progressbar');
      bar.setAttribute('aria-valuenow', String(Math.round(share * 100)));
      const amount = f.size
        ? `${bytes(f.received)} of ${bytes(f.size)} (${Math.round(share * 100)}%)`
        : bytes(f.received);
      const box = el(
        'div',
        'fetch',
        undefined,
        el(
          'div',
          'what',
          undefined,
          el('span', 'ref', `${f.upstream}/${f.repository}@${f.digest.slice(0, 19)}`),
          el(
            'span',
            'small',
            `${amount} · ${bytes(f.bytesPerSecond)}/s · ${f.clients} ${f.clients === 1 ? 'client' : 'clients'}${f.from === 'replica' ? ' · from another replica' : ''}`,
          ),
        ),
        bar,
      );
      box.dataset.digest = f.digest;
      box.dataset.received = String(f.received);
      return box;
    }),
  );
}

function renderEvents(recent, now) {
  const item = (when, text, why) =>
    el('li', '', undefined, el('span', 'when', ago(when, now)), text, ' ', el('span', 'why', why));
  const times = (n) => (n > 1 ? ` (×${n})` : '');
  $('upstream-failures').replaceChildren(
    ...(recent.upstreamFailures.length === 0
      ? [el('li', 'empty', 'None.')]
      : recent.upstreamFailures.map((f) =>
          item(f.at, `${f.upstream}: ${f.what}${times(f.count)}`, f.reason),
        )),
  );
  $('refused').replaceChildren(
    ...(recent.refused.length === 0
      ? [el('li', 'empty', 'None.')]
      : recent.refused.map((r) =>
          item(
            r.at,
            `${r.client} ${r.method} ${r.path} → ${r.status}${times(r.count)}`,
            `${r.code}: ${r.reason}`,
          ),
        )),
  );
}

// ---- the images ---------------------------------------------------------------------------

const images = {
  all: [],
  shown: [],
  sort: { key: 'lastPulled', descending: true },
  filter: '',
  admin: false,
  /** usage figures the list was fetched at: a change means a new fetch. */
  version: '',
  fetchedAt: 0,
  loading: false,
  again: false,
};

const reference = (i) => i.references[0] ?? `${i.upstream}/${i.repository}@${i.digest}`;

function sortAndFilter() {
  const needle = images.filter.trim().toLowerCase();
  const shown = needle
    ? images.all.filter(
        (i) =>
          i.digest.includes(needle) || i.references.some((r) => r.toLowerCase().includes(needle)),
      )
    : images.all.slice();
  const { key, descending } = images.sort;
  const value = (i) =>
    key === 'reference' ? reference(i) : key === 'pinned' ? (i.pinned ? 1 : 0) : i[key];
  shown.sort((a, b) => {
    const va = value(a);
    const vb = value(b);
    const c = typeof va === 'string' ? va.localeCompare(vb) : va - vb;
    return (descending ? -c : c) || reference(a).localeCompare(reference(b));
  });
  images.shown = shown;
  $('image-count').textContent =
    shown.length === images.all.length
      ? images.all.length.toLocaleString('en')
      : `${shown.length.toLocaleString('en')} of ${images.all.length.toLocaleString('en')}`;
  $('images-empty').hidden = shown.length > 0;
  for (const b of document.querySelectorAll('.grid-head button')) {
    if (b.dataset.sort === key)
      b.setAttribute('aria-sort', descending ? 'descending' : 'ascending');
    else b.removeAttribute('aria-sort');
  }
  $('images-spacer').style.height = `${shown.length * ROW_HEIGHT}px`;
  renderRows();
}

/** Only the rows in view (and a few around them) exist in the page. */
function renderRows() {
  const scroll = $('images-scroll');
  const first = Math.max(0, Math.floor(scroll.scrollTop / ROW_HEIGHT) - 5);
  const count = Math.ceil(scroll.clientHeight / ROW_HEIGHT) + 10;
  const rows = images.shown.slice(first, first + count).map(imageRow);
  const block = $('images-rows');
  block.style.transform = `translateY(${first * ROW_HEIGHT}px)`;
  block.replaceChildren(...rows);
}

function imageRow(image) {
  const refs = image.references.join(', ');
  const row = el(
    'div',
    'image-row',
    undefined,
    el('span', 'ref', reference(image)),
    el('span', 'size', bytes(image.size)),
    el('span', 'pulled', ago(image.lastPulled)),
    el('span', 'pinned', image.pinned ? 'pinned' : ''),
  );
  row.title = `${refs}\n${image.digest}\n${bytes(image.ownBytes)} own, ${bytes(image.sharedBytes)} shared`;
  row.dataset.reference = reference(image);
  const actions = el('span', 'actions');
  if (images.admin) {
    const name = image.references[0] ?? `${image.upstream}/${image.repository}@${image.digest}`;
    const pin = el('button', 'pin', image.pinned ? 'Unpin' : 'Pin');
    pin.addEventListener('click', () =>
      change(image.pinned ? 'DELETE' : 'POST', '/pins', { references: [name] }),
    );
    const remove = el('button', 'danger remove', 'Remove');
    remove.addEventListener('click', () => {
      // A second click within 3 s confirms.
      if (remove.classList.contains('confirm')) {
        void change('POST', '/remove', { references: [name] });
        return;
      }
      remove.classList.add('confirm');
      remove.textContent = 'Sure?';
      window.setTimeout(() => {
        remove.classList.remove('confirm');
        remove.textContent = 'Remove';
      }, 3000);
    });
    actions.append(pin, remove);
  }
  row.append(actions);
  return row;
}

async function change(method, path, body) {
  const res = await fetch(`${API}${path}`, {
    method,
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  if (!res.ok) {
    const text = await res.text();
    let message = text.slice(0, 200);
    try {
      message = JSON.parse(text).errors[0].message;
    } catch {
      // as it came
    }
    $('image-mode').textContent = `failed: ${message}`;
  } else {
    const answer = await res.json();
    const problems = answer.problems ?? [];
    $('image-mode').textContent = problems.length > 0 ? problems.join('; ') : '';
  }
  await loadImages();
}

/** Fetches the images; asked again while a fetch is under way, it fetches once more after. */
async function loadImages() {
  if (images.loading) {
    images.again = true;
    return;
  }
  images.loading = true;
  try {
    do {
      images.again = false;
      const res = await fetch(`${API}/images`, { cache: 'no-store' });
      if (!res.ok) continue;
      images.all = await res.json();
      images.fetchedAt = performance.now();
      sortAndFilter();
    } while (images.again);
  } finally {
    images.loading = false;
  }
}

// ---- polling ------------------------------------------------------------------------------

let started = false;

async function poll() {
  let fetching = false;
  try {
    const res = await fetch(`${API}/status`, { cache: 'no-store' });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const status = await res.json();
    const now = Date.parse(status.now);
    $('connection').textContent = 'live';
    $('connection').className = 'badge live';
    $('version').textContent = `v${status.version}`;
    $('uptime').textContent = `up ${duration((now - Date.parse(status.startedAt)) / 1000)}`;
    renderTraffic(status);
    renderStorage(status.storage);
    renderChart(status.history, now);
    renderUpstreams(status.upstreams);
    renderFetches(status.fetches);
    renderEvents(status.recent, now);
    fetching = status.fetches.length > 0;
    const version = `${status.storage.images}:${status.storage.bytes}`;
    const adminChanged = images.admin !== status.viewer.admin;
    images.admin = status.viewer.admin;
    const readOnly = 'read-only: pinning and removing need the admin action';
    if (!images.admin) $('image-mode').textContent = readOnly;
    else if ($('image-mode').textContent === readOnly) $('image-mode').textContent = '';
    if (
      version !== images.version ||
      performance.now() - images.fetchedAt > IMAGES_EVERY_MS ||
      !started
    ) {
      images.version = version;
      started = true;
      void loadImages();
    } else if (adminChanged) {
      renderRows();
    }
  } catch {
    $('connection').textContent = 'not answering';
    $('connection').className = 'badge lost';
  }
  window.setTimeout(poll, fetching ? POLL_FETCHING_MS : POLL_MS);
}

$('images-scroll').addEventListener('scroll', () => window.requestAnimationFrame(renderRows));
$('image-search').addEventListener('input', (e) => {
  images.filter = e.target.value;
  $('images-scroll').scrollTop = 0;
  sortAndFilter();
});
for (const button of document.querySelectorAll('.grid-head button')) {
  button.addEventListener('click', () => {
    const key = button.dataset.sort;
    images.sort =
      images.sort.key === key
        ? { key, descending: !images.sort.descending }
        : { key, descending: key !== 'reference' };
    sortAndFilter();
  });
}
window.addEventListener('resize', renderRows);
void poll();
