// The dispatcher's web page: submit a job, watch its previews over the SSE
// stream, show the final grid and images, list the key's recent jobs.
// Plain JavaScript, no build step; it uses only the public API:
//   GET  /v1/limits                the form's ranges and defaults
//   GET  /v1/loras                 the LoRA picker's choices
//   POST /v1/jobs                  submit (errors: 422 {error, field}); an
//                                  uploaded image and mask go as data: URLs
//   GET  /v1/jobs                  the key's jobs, newest first (the recent list)
//   GET  /v1/jobs/{id}/events      SSE: status, progress/preview, a terminal event
//   GET  /v1/jobs/{id}             the status record (timings, error)
//   GET  /v1/jobs/{id}/images      the grid and images with fresh presigned URLs
//   DELETE /v1/jobs/{id}           cancel
// The API client (fetch with the saved key, the SSE reader) is in api.js,
// the image, mask and LoRA inputs in inputs.js, both loaded before this file.
'use strict';

const RECENT_PAGE = 25; // jobs per page of the recent list
const INTEGER_FIELDS = ['width', 'height', 'num_inference_steps', 'num_images', 'preview_every', 'priority'];
const NUMBER_FIELDS = [...INTEGER_FIELDS, 'guidance_scale', 'strength'];
// Chosen as files: sent as data: URLs, never as the input's value.
const FILE_FIELDS = ['image', 'mask'];
// Fields chosen from the limits' `one_of` list.
const CHOICE_FIELDS = ['scheduler', 'output_format'];
const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

const $ = (id) => document.getElementById(id);
const form = $('job-form');

let limits = null;
// The job on screen: its id, the AbortController of its event stream, the
// last status seen, and the previews received.
let shown = null;

// ------------------------------------------------------------ the form --

function hintFor(name, limit) {
  if (!limit) return '';
  switch (name) {
    case 'prompt':
      return `${limit.min_chars}–${limit.max_chars} characters`;
    case 'negative_prompt':
      return `at most ${limit.max_chars} characters; empty: none`;
    case 'seed':
      return 'any integer from 0 to 2^64−1; empty: drawn by the server';
    case 'num_images':
      return `${limit.min}–${limit.max}; empty: one per GPU of the worker`;
    case 'preview_every':
      return `${limit.min}–${limit.max} steps; 0: no previews`;
    case 'output_format':
    case 'scheduler':
      return limit.one_of.join(', ');
    case 'strength':
      return `above ${limit.min_exclusive}, at most ${limit.max}; empty: ${limit.default_img2img} (img2img), ${limit.default_inpainting} (inpainting)`;
    case 'loras':
      return `at most ${limit.max_count}, each with a scale from ${limit.scale.min} to ${limit.scale.max}`;
    default: {
      let text = `${limit.min}–${limit.max}`;
      if (limit.multiple_of) text += `, a multiple of ${limit.multiple_of}`;
      return text;
    }
  }
}

function applyLimits() {
  for (const name of CHOICE_FIELDS) {
    if (!limits[name]) continue;
    form.elements[name].replaceChildren(...limits[name].one_of.map((value) => new Option(value, value)));
  }
  for (const [name, limit] of Object.entries(limits)) {
    const input = form.elements[name];
    if (!input) continue;
    if (NUMBER_FIELDS.includes(name) && limit.min !== undefined) {
      input.min = limit.min;
      input.max = limit.max;
      input.step = limit.multiple_of ?? (INTEGER_FIELDS.includes(name) ? 1 : 'any');
    }
    if (limit.max_chars) input.maxLength = limit.max_chars;
    const hint = form.querySelector(`[data-hint="${name}"]`);
    if (hint) hint.textContent = hintFor(name, limit);
  }
  const bytes = `PNG, JPEG or WebP, at most ${(limits.max_image_bytes / 1048576).toFixed(0)} MiB`;
  form.querySelector('[data-hint="image"]').textContent = `${bytes}; the size defaults to the image's`;
  form.querySelector('[data-hint="mask"]').textContent = `${bytes}, the image's size; needs an image`;
  if (limits.strength) form.elements.strength.max = limits.strength.max;
  if (limits.loras) form.querySelector('[data-hint="loras"]').textContent = hintFor('loras', limits.loras);
}

function fillDefaults() {
  for (const [name, limit] of Object.entries(limits ?? {})) {
    const input = form.elements[name];
    if (!input || name === 'prompt' || FILE_FIELDS.includes(name)) continue;
    input.value = limit.default ?? '';
  }
  for (const field of FILE_FIELDS) clearUpload(field);
  $('loras').replaceChildren();
}

async function loadLimits() {
  try {
    limits = await api('GET', '/v1/limits');
  } catch (error) {
    showFormError(error);
    return;
  }
  hideFormError();
  applyLimits();
  loadLoras();
  if (!form.dataset.filled) {
    fillDefaults();
    form.dataset.filled = 'yes';
  }
}

// The body exactly as typed: empty fields are left to the server's defaults,
// anything else is sent (a number when it reads as one) so that the server's
// rule, not the browser, decides and words the error.
function requestBody() {
  const body = {};
  let seed = null;
  for (const element of form.elements) {
    const { name } = element;
    if (!name || FILE_FIELDS.includes(name)) continue;
    const raw = element.value;
    if (name === 'prompt' || name === 'negative_prompt') {
      body[name] = raw;
    } else if (raw.trim() === '') {
      continue;
    } else if (name === 'seed' && /^-?\d+$/.test(raw.trim())) {
      seed = raw.trim(); // spliced in as digits: no rounding
    } else if (NUMBER_FIELDS.includes(name) || name === 'seed') {
      const number = Number(raw);
      body[name] = Number.isFinite(number) ? number : raw;
    } else {
      body[name] = raw;
    }
  }
  for (const field of FILE_FIELDS) {
    if (uploads[field]) body[field] = uploads[field].dataUrl;
  }
  const loras = chosenLoras();
  if (loras.length) body.loras = loras;
  let json = JSON.stringify(body);
  if (seed !== null) json = `${json.slice(0, -1)}${json.length > 2 ? ',' : ''}"seed":${seed}}`;
  return json;
}

function clearFieldErrors() {
  for (const element of form.querySelectorAll('[aria-invalid]')) element.removeAttribute('aria-invalid');
  for (const element of form.querySelectorAll('.field-error')) element.textContent = '';
}

function showFormError(error) {
  const box = $('form-error');
  box.textContent = error.message;
  box.hidden = false;
  clearFieldErrors();
  const input = error.field
    ? form.elements[error.field] ?? form.querySelector(`[data-field="${error.field}"]`)
    : null;
  if (input) {
    input.setAttribute('aria-invalid', 'true');
    form.querySelector(`[data-error="${error.field}"]`).textContent = error.message;
    input.focus();
  }
}

function hideFormError() {
  $('form-error').hidden = true;
  clearFieldErrors();
}

async function submitJob(event) {
  event.preventDefault();
  const button = $('submit');
  button.disabled = true;
  hideFormError();
  try {
    const submitted = await api('POST', '/v1/jobs', requestBody());
    remember(submitted.status);
    openJob(submitted.id);
  } catch (error) {
    showFormError(error);
  } finally {
    button.disabled = false;
  }
}

// A job's settings back in the form (its stored image and mask are not
// files of this browser: choose them again).
function fillForm(request) {
  for (const [name, value] of Object.entries(request)) {
    const input = form.elements[name];
    if (input && !FILE_FIELDS.includes(name) && typeof value !== 'object') input.value = value ?? '';
  }
  form.elements.strength.value = request.strength ?? '';
  $('loras').replaceChildren();
  for (const lora of request.loras ?? []) addLora(lora.name, lora.scale);
  form.elements.num_images.value = request.num_images ?? '';
  hideFormError();
}

function reuseSeed(seed) {
  const input = form.elements.seed;
  input.value = seed;
  input.focus();
  input.classList.remove('flash');
  void input.offsetWidth; // restart the animation
  input.classList.add('flash');
}

// ------------------------------------------------------ the recent jobs --
// The key's jobs as the server lists them (GET /v1/jobs, newest first; an
// admin key's: every job), so they follow the key to any browser. "Older"
// loads the next page; the open job keeps its state there up to date.

let [recent, recentCursor, recentError] = [[], null, null];

function summary(status) {
  return { id: status.id, prompt: status.request.prompt, state: status.state, created_at: status.created_at };
}

async function loadRecent(more = false) {
  const query = new URLSearchParams({ limit: String(RECENT_PAGE) });
  if (more && recentCursor) query.set('cursor', recentCursor);
  try {
    const page = await api('GET', `/v1/jobs?${query}`);
    const jobs = page.jobs.map(summary);
    // A first page replaces the list; an older one goes below it.
    recent = more ? [...recent, ...jobs.filter((job) => !recent.some((r) => r.id === job.id))] : jobs;
    recentCursor = page.next_cursor;
    recentError = null;
  } catch (error) {
    recentError = error.status === 401 ? 'Paste your API key above to see your jobs.' : error.message;
    if (!more) [recent, recentCursor] = [[], null];
  }
  renderRecent();
}

function remember(status) {
  recent = [summary(status), ...recent.filter((job) => job.id !== status.id)];
  renderRecent();
}

function rememberState(id, state) {
  const job = recent.find((j) => j.id === id);
  if (!job || job.state === state) return;
  job.state = state;
  renderRecent();
}

function renderRecent() {
  const ul = $('recent');
  ul.replaceChildren(
    ...recent.map((job) => {
      const li = document.createElement('li');
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'recent-job';
      button.dataset.id = job.id;
      if (shown && shown.id === job.id) button.setAttribute('aria-current', 'true');
      const state = document.createElement('span');
      state.className = 'state';
      state.dataset.state = job.state;
      state.textContent = job.state;
      const prompt = document.createElement('span');
      prompt.className = 'recent-prompt';
      prompt.textContent = job.prompt;
      const when = document.createElement('time');
      when.dateTime = job.created_at;
      when.textContent = new Date(job.created_at).toLocaleString();
      button.append(state, prompt, when);
      button.addEventListener('click', () => openJob(job.id));
      li.append(button);
      return li;
    }),
  );
  const empty = $('recent-empty');
  empty.textContent = recentError ?? 'None yet.';
  empty.hidden = recent.length > 0 && !recentError;
  $('older-recent').hidden = !recentCursor;
}

// ---------------------------------------------------------- one job view --

function resetJobView(id) {
  $('job').hidden = false;
  $('job-id').textContent = id;
  $('job-prompt').textContent = '';
  setState('');
  $('progress').value = 0;
  $('step').textContent = '';
  for (const box of ['job-error', 'job-notice', 'preview-box', 'grid-box', 'timings', 'job-actions', 'cancel']) {
    $(box).hidden = true;
  }
  $('preview').removeAttribute('src');
  $('grid').removeAttribute('src');
  $('grid-link').removeAttribute('href');
  $('images').replaceChildren();
  $('job').dataset.previews = '0';
}

function setState(state) {
  const badge = $('job-state');
  badge.textContent = state;
  badge.dataset.state = state;
  $('job').dataset.state = state;
  $('cancel').hidden = !(state === 'queued' || state === 'running');
}

function setProgress(step, total) {
  if (!total) return;
  $('progress').max = total;
  $('progress').value = step;
  $('step').textContent = `step ${step} / ${total}`;
}

function showJobError(message) {
  const box = $('job-error');
  box.textContent = message;
  box.hidden = false;
}

function notice(message) {
  const box = $('job-notice');
  box.textContent = message ?? '';
  box.hidden = !message;
}

function renderStatus(job, status) {
  job.status = status;
  setState(status.state);
  $('job-prompt').textContent = status.request.prompt;
  const r = status.request;
  const mode = r.mask ? 'inpainting' : r.image ? 'img2img' : 'text to image';
  let settings = `${mode}, ${r.width}×${r.height}, ${r.num_inference_steps} steps, guidance ${r.guidance_scale}, sampler ${r.scheduler ?? 'euler'}`;
  if (r.strength !== undefined && r.strength !== null) settings += `, strength ${r.strength}`;
  if (r.loras?.length) settings += `, LoRAs ${r.loras.map((l) => `${l.name}:${l.scale}`).join(', ')}`;
  $('job-settings').textContent = settings;
  setProgress(status.progress.step, status.progress.total_steps);
  $('job-actions').hidden = false;
  rememberState(status.id, status.state);
}

function showPreview(event) {
  const box = $('preview-box');
  $('preview').src = event.image;
  $('preview-caption').textContent = `preview at step ${event.step} / ${event.total_steps}`;
  box.hidden = false;
  $('job').dataset.previews = String(Number($('job').dataset.previews) + 1);
}

function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms} ms`;
}

function renderTimings(status) {
  const t = status.result?.timings;
  if (!t) return;
  const rows = [
    ['queue wait', t.queue_wait_ms],
    ['model (all stages)', t.model_ms],
    ['text encode', t.text_encode_ms],
    ...(t.image_encode_ms ? [['image encode', t.image_encode_ms]] : []),
    ['denoise', t.denoise_ms],
    ['of which previews', t.preview_ms],
    ['decode', t.decode_ms],
    ['upload', t.upload_ms],
  ];
  if (status.started_at && status.finished_at) {
    rows.push(['start to finish', Date.parse(status.finished_at) - Date.parse(status.started_at)]);
  }
  $('timings').tBodies[0].replaceChildren(
    ...rows.map(([name, ms]) => {
      const tr = document.createElement('tr');
      const th = document.createElement('th');
      th.textContent = name;
      const td = document.createElement('td');
      td.textContent = formatMs(ms);
      tr.append(th, td);
      return tr;
    }),
  );
  $('timings').hidden = false;
}

function renderImages(images) {
  $('images').replaceChildren(
    ...images.images.map((image, index) => {
      const li = document.createElement('li');
      const link = document.createElement('a');
      link.href = image.url;
      link.target = '_blank';
      link.rel = 'noopener';
      const img = document.createElement('img');
      img.src = image.url;
      img.alt = `image ${index}, seed ${image.seed}`;
      img.loading = 'lazy';
      link.append(img);
      const seed = document.createElement('span');
      seed.className = 'seed';
      seed.append('seed ');
      const code = document.createElement('code');
      code.textContent = image.seed;
      seed.append(code);
      const reuse = document.createElement('button');
      reuse.type = 'button';
      reuse.className = 'reuse-seed';
      reuse.textContent = 'Reuse seed';
      reuse.addEventListener('click', () => reuseSeed(image.seed));
      li.append(link, seed, reuse);
      return li;
    }),
  );
  const grid = images.grid;
  $('grid').src = grid.url;
  $('grid').alt = `final grid of ${images.images.length} image(s)`;
  $('grid-link').href = grid.url;
  $('grid-caption').textContent = `${grid.width}×${grid.height} · click to open full size`;
  $('grid-box').hidden = false;
  $('preview-box').hidden = true;
}

// The end of a job: the record holds the error or the timings; a succeeded
// job's images come with fresh URLs.
async function finish(job) {
  try {
    const status = await api('GET', `/v1/jobs/${job.id}`);
    if (shown !== job) return;
    renderStatus(job, status);
    renderTimings(status);
    if (status.state === 'failed') showJobError(status.error ?? 'failed');
    if (status.state === 'succeeded') {
      const images = await api('GET', `/v1/jobs/${job.id}/images`);
      if (shown !== job) return;
      renderImages(images);
    }
  } catch (error) {
    if (shown === job) showJobError(error.message);
  }
}

function handleEvent(job, { event, data }) {
  const payload = parseJson(data);
  switch (event) {
    case 'status':
      renderStatus(job, payload);
      return TERMINAL.has(payload.state);
    case 'progress':
      markRunning(job);
      setProgress(payload.step, payload.total_steps);
      return false;
    case 'preview':
      markRunning(job);
      showPreview(payload);
      return false;
    case 'succeeded':
    case 'failed':
    case 'cancelled':
      setState(event);
      rememberState(job.id, event);
      setProgress(payload.step, payload.total_steps);
      if (payload.error) showJobError(payload.error);
      return true;
    default:
      return false;
  }
}

// Events flow once a worker runs the job: the status said `queued` then.
function markRunning(job) {
  if ($('job').dataset.state !== 'queued') return;
  setState('running');
  rememberState(job.id, 'running');
}

// Follows the job's events until a terminal one, reconnecting when the
// stream drops (the first event of a new stream is the current status).
async function follow(job) {
  const { signal } = job.abort;
  for (let attempt = 0; !signal.aborted; attempt++) {
    let ended = false;
    try {
      const response = await fetch(`/v1/jobs/${job.id}/events`, {
        headers: headers({ accept: 'text/event-stream' }),
        signal,
      });
      if (!response.ok) {
        const text = await response.text();
        let body = null;
        try {
          body = parseJson(text);
        } catch {
          body = null;
        }
        throw new ApiError(response.status, body, text);
      }
      notice(null);
      for await (const event of sseEvents(response.body)) {
        if (shown !== job) return;
        attempt = 0;
        if (handleEvent(job, event)) {
          ended = true;
          break;
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status < 500 && error.status !== 429) {
        showJobError(error.message); // unknown job, bad key: retrying will not help
        return;
      }
      notice(`connection lost (${error.message}); reconnecting…`);
    }
    if (ended) {
      await finish(job);
      return;
    }
    await sleep(Math.min(500 * 2 ** attempt, 5000));
  }
}

function openJob(id) {
  if (shown) shown.abort.abort();
  const job = { id, abort: new AbortController(), status: null };
  shown = job;
  resetJobView(id);
  history.replaceState(null, '', `#${id}`);
  renderRecent();
  follow(job);
}

async function cancelShown() {
  const job = shown;
  if (!job) return;
  $('cancel').disabled = true;
  try {
    const status = await api('DELETE', `/v1/jobs/${job.id}`);
    if (shown !== job) return;
    // A queued job is cancelled now; a running one stops between two steps
    // and its `cancelled` event comes through the stream.
    renderStatus(job, status);
    if (status.state === 'running') notice('cancel requested: the worker stops between two steps');
  } catch (error) {
    if (shown === job) showJobError(error.message);
  } finally {
    $('cancel').disabled = false;
  }
}

// ------------------------------------------------------------- start up --

function setUpKey() {
  const input = $('api-key');
  input.value = apiKey();
  const describe = () => {
    $('key-state').textContent = apiKey() ? 'key saved in this browser' : '';
  };
  describe();
  $('key-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
    describe();
    loadLimits();
    if (shown) openJob(shown.id);
    loadRecent();
  });
}

function start() {
  setUpKey();
  form.addEventListener('submit', submitJob);
  $('reset-form').addEventListener('click', () => {
    fillDefaults();
    form.elements.prompt.value = '';
    hideFormError();
  });
  $('cancel').addEventListener('click', cancelShown);
  for (const field of FILE_FIELDS) {
    form.elements[field].addEventListener('change', () => readUpload(field));
  }
  for (const button of form.querySelectorAll('.clear-input')) {
    button.addEventListener('click', () => clearUpload(button.dataset.clear));
  }
  $('add-lora').addEventListener('click', () => addLora(registry[0]?.name));
  $('reuse-settings').addEventListener('click', () => {
    if (shown?.status) fillForm(shown.status.request);
  });
  $('refresh-recent').addEventListener('click', () => loadRecent());
  $('older-recent').addEventListener('click', () => loadRecent(true));
  renderRecent();
  loadRecent();
  loadLimits();
  const id = location.hash.slice(1);
  if (UUID.test(id)) openJob(id);
}

start();
