// The web page's inputs beyond text: the image and mask uploads (read as
// data: URLs, shown as thumbnails) and the LoRA picker (filled from
// GET /v1/loras). Loaded after api.js and before app.js, whose `$`, `form`
// and `limits` it uses when called.
'use strict';

// The registered LoRAs (GET /v1/loras), for the picker.
let registry = [];
// The uploaded image and mask: {dataUrl, width, height, name}.
const uploads = { image: null, mask: null };

function clearUpload(field) {
  uploads[field] = null;
  form.elements[field].value = '';
  $(`${field}-thumb`).hidden = true;
  $(`${field}-preview`).removeAttribute('src');
}

// Reads the chosen file as a data: URL and shows it with its size.
function readUpload(field) {
  const file = form.elements[field].files[0];
  if (!file) {
    clearUpload(field);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    const img = $(`${field}-preview`);
    img.onload = () => {
      uploads[field] = { dataUrl: reader.result, width: img.naturalWidth, height: img.naturalHeight, name: file.name };
      $(`${field}-caption`).textContent = `${file.name}, ${img.naturalWidth}×${img.naturalHeight}`;
      $(`${field}-thumb`).hidden = false;
    };
    // Not an image the browser can show: still sent, for the server to word the error.
    img.onerror = () => {
      uploads[field] = { dataUrl: reader.result, width: 0, height: 0, name: file.name };
      $(`${field}-caption`).textContent = `${file.name} (not an image this browser shows)`;
      $(`${field}-thumb`).hidden = false;
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

async function loadLoras() {
  try {
    registry = (await api('GET', '/v1/loras')).loras ?? [];
  } catch {
    registry = [];
  }
  for (const select of document.querySelectorAll('#loras select')) fillLoraOptions(select, select.value);
  $('add-lora').disabled = registry.length === 0;
  $('add-lora').title = registry.length ? '' : 'no LoRA registered yet (an admin key uploads one: PUT /v1/loras/{name})';
}

function fillLoraOptions(select, chosen) {
  const names = registry.map((r) => r.name);
  if (chosen && !names.includes(chosen)) names.push(chosen);
  select.replaceChildren(
    ...names.map((name) => {
      const record = registry.find((r) => r.name === name);
      const label = record ? `${name} (${record.format}, rank ${record.ranks.join('/')})` : `${name} (not registered)`;
      return new Option(label, name);
    }),
  );
  if (chosen) select.value = chosen;
}

function addLora(name, scale) {
  const li = document.createElement('li');
  const select = document.createElement('select');
  select.className = 'lora-name';
  select.setAttribute('aria-label', 'LoRA');
  fillLoraOptions(select, name);
  const weight = document.createElement('input');
  weight.type = 'number';
  weight.className = 'lora-scale';
  weight.step = 'any';
  weight.setAttribute('aria-label', 'scale');
  weight.value = scale ?? limits?.loras?.scale.default ?? 1;
  if (limits?.loras) {
    weight.min = limits.loras.scale.min;
    weight.max = limits.loras.scale.max;
  }
  const remove = document.createElement('button');
  remove.type = 'button';
  remove.textContent = 'Remove';
  remove.addEventListener('click', () => li.remove());
  li.append(select, weight, remove);
  $('loras').append(li);
}

function chosenLoras() {
  return [...document.querySelectorAll('#loras li')].map((li) => {
    const raw = li.querySelector('.lora-scale').value.trim();
    const scale = Number(raw);
    const lora = { name: li.querySelector('.lora-name').value };
    if (raw !== '') lora.scale = Number.isFinite(scale) ? scale : raw;
    return lora;
  });
}

