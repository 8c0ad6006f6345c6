// The web page's API client: every request carries `Authorization: Bearer
// <key>` when a key is saved in this browser, errors come back as ApiError
// with the server's words and field, and the events are read with fetch()
// (EventSource cannot send headers) and parsed here. Loaded before app.js.
'use strict';

const KEY_STORE = 'sdxl-queue.api-key';

class ApiError extends Error {
  constructor(status, body, text) {
    const worded = body && typeof body.error === 'string' ? body.error : null;
    super(worded ?? `HTTP ${status}${text ? `: ${text.trim().slice(0, 300)}` : ''}`);
    this.status = status;
    this.field = body && typeof body.field === 'string' ? body.field : null;
  }
}

function apiKey() {
  return localStorage.getItem(KEY_STORE) || '';
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, authorization: `Bearer ${key}` } : extra;
}

// Seeds are u64 and JavaScript numbers hold 53 bits: a drawn seed would be
// rounded by JSON.parse. Seeds are read as strings instead (a `"seed":`
// inside a string value is escaped as `\"seed\":`, so only keys match).
function parseJson(text) {
  return JSON.parse(text.replace(/"seed":\s*(\d+)/g, '"seed":"$1"'));
}

async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { 'content-type': 'application/json' }) };
  if (body !== undefined) init.body = body;
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try {
    data = text ? parseJson(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) throw new ApiError(response.status, data, text);
  return data;
}

// Server-sent events from a fetch() body: yields {event, data} per event.
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, '\n');
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = parseSseBlock(block);
        if (event) yield event;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function parseSseBlock(block) {
  let event = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (line === '' || line.startsWith(':')) continue; // comments: keep-alives
    const colon = line.indexOf(':');
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (name === 'event') event = value;
    else if (name === 'data') data.push(value);
  }
  return data.length ? { event, data: data.join('\n') } : null;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

