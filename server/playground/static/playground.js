// The playground page: pick an image, caption it at several conservativeness levels at once (each column
// streams on its own, so a slow or failed one never holds up the rest), then mark the object words that differ.
import { getJSON, PlaygroundError } from './api.js';
import { captionInto, failureMessage, makeColumn, markDifferences, seconds } from './columns.js';
import { readImageFile, sampleImage } from './images.js';
import { readLevels, setUpLevels } from './levels.js';
import { Vocabulary } from './objects.js';

const KEY_STORAGE = 'sevi-playground-api-key'; // sessionStorage: this tab only, gone when it closes
const $ = (id) => document.getElementById(id);

const state = {
  config: null,
  vocabulary: null,
  image: null, // {dataUri, name, truth: string[] | null (a sample scene's objects), sample: file name | null}
  loading: Promise.resolve(), // the image being read: Compare waits for it rather than captioning the old one
  run: null, // {controller} of the comparison in flight
};

// ------------------------------------------------------------------------------------------ messages
function showAlert(message) {
  $('alert').textContent = message;
  $('alert').hidden = false;
}

function clearAlert() {
  $('alert').hidden = true;
  $('alert').textContent = '';
}

function setStatus(message) {
  $('status').textContent = message;
}

// -------------------------------------------------------------------------------------------- image
function showImage(image, previewable) {
  state.image = image;
  const preview = $('preview');
  preview.hidden = !previewable;
  if (previewable) {
    preview.src = image.dataUri;
    preview.alt = `The image to caption: ${image.name}`;
  }
  $('image-name').textContent = previewable ? image.name : `${image.name}: this browser cannot show it as an image.`;
  $('drop-hint').textContent = 'Drop another image, paste one, or';
  $('truth-legend').hidden = !image.truth;
  for (const button of document.querySelectorAll('.sample')) {
    button.setAttribute('aria-pressed', String(button.dataset.file === image.sample));
  }
}

function takeFile(file) {
  state.loading = readFile(file);
}

// A file that cannot be used also drops the image before it: Compare must not caption that one instead.
function forgetImage(message) {
  state.image = null;
  $('preview').hidden = true;
  $('image-name').textContent = '';
  showAlert(message);
}

async function readFile(file) {
  clearAlert();
  if (!file) return;
  if (file.size > state.config.max_image_bytes) {
    const mb = (state.config.max_image_bytes / (1024 * 1024)).toFixed(2);
    forgetImage(`${file.name} is too large: this server takes images of at most ${mb} MB.`);
    return;
  }
  try {
    const { dataUri, isImage } = await readImageFile(file);
    showImage({ dataUri, name: file.name, truth: null, sample: null }, isImage);
  } catch (err) {
    forgetImage(`Could not read ${file.name}: ${err.message}`);
  }
}

function setUpImageInput() {
  $('image-input').addEventListener('change', (e) => takeFile(e.target.files[0]));
  const zone = $('drop-zone');
  zone.addEventListener('dragover', (e) => {
    e.preventDefault();
    zone.classList.add('dragging');
  });
  zone.addEventListener('dragleave', () => zone.classList.remove('dragging'));
  zone.addEventListener('drop', (e) => {
    e.preventDefault();
    zone.classList.remove('dragging');
    takeFile(e.dataTransfer.files[0]);
  });
  document.addEventListener('paste', (e) => {
    const file = [...(e.clipboardData?.files ?? [])].find((f) => f.type.startsWith('image/'));
    if (file) takeFile(file);
  });
}

async function setUpSamples() {
  let samples;
  try {
    samples = await getJSON('playground/assets/samples/samples.json');
  } catch {
    return; // the page works without them
  }
  const list = $('sample-list');
  for (const sample of samples) {
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'sample';
    button.dataset.file = sample.file;
    button.setAttribute('aria-pressed', 'false');
    const img = document.createElement('img');
    img.src = `playground/assets/samples/${sample.file}`;
    img.alt = '';
    const label = document.createElement('span');
    label.textContent = sample.label;
    button.append(img, label);
    button.addEventListener('click', () => {
      clearAlert();
      state.loading = sampleImage(`playground/assets/samples/${sample.file}`).then((dataUri) => {
        const name = `${sample.label} (${sample.objects.join(', ')})`;
        showImage({ dataUri, name, truth: sample.objects, sample: sample.file }, true);
      }, (err) => showAlert(`Could not load the sample: ${err.message}`));
    });
    list.append(button);
  }
  $('samples').hidden = samples.length === 0;
}

// ------------------------------------------------------------------------------------------ API key
function apiKey() {
  return $('api-key').value.trim();
}

function setUpKey() {
  $('key-section').hidden = !state.config.auth_required;
  $('api-key').value = sessionStorage.getItem(KEY_STORAGE) ?? '';
  $('api-key').addEventListener('input', () => sessionStorage.setItem(KEY_STORAGE, apiKey()));
  $('forget-key').addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $('api-key').value = '';
    $('api-key').focus();
  });
}

function askForKey(message) {
  $('key-section').hidden = false;
  showAlert(message);
  $('api-key').focus();
}

// -------------------------------------------------------------------------------------------- a run
function setRunning(running) {
  $('stop').disabled = !running;
  $('results').setAttribute('aria-busy', String(running));
}

async function compare() {
  await state.loading;
  clearAlert();
  const { levels, error, field } = readLevels();
  if (error) {
    showAlert(error);
    field.focus();
    return;
  }
  if (!state.image) {
    showAlert('Choose an image first (or one of the sample scenes).');
    $('image-input').focus();
    return;
  }
  if (!$('key-section').hidden && !apiKey()) {
    askForKey('This server needs an API key: enter it in the API key field, then try again.');
    return;
  }
  const maxTokens = Number($('max-tokens').value);
  if (!(Number.isInteger(maxTokens) && maxTokens >= 1 && maxTokens <= state.config.max_tokens_limit)) {
    showAlert(`Max tokens must be a whole number from 1 to ${state.config.max_tokens_limit}.`);
    $('max-tokens').focus();
    return;
  }
  state.run?.controller.abort('stopped'); // a new comparison replaces the one in flight
  const controller = new AbortController();
  const run = { controller };
  state.run = run;
  // The server has its own deadline; this one is for a server that stops answering altogether.
  const timeoutS = Math.ceil(state.config.request_timeout_s + 15);
  const request = {
    image: state.image.dataUri, prompt: $('prompt').value.trim() || state.config.default_prompt, maxTokens,
    apiKey: apiKey(), limits: state.config, timeoutS,
    signal: AbortSignal.any([controller.signal, AbortSignal.timeout(timeoutS * 1000)]),
  };
  const columns = levels.map(makeColumn);
  $('columns').replaceChildren(...columns.map((c) => c.article));
  $('columns').dataset.count = String(columns.length);
  setRunning(true);
  setStatus(`Captioning at ${levels.length} level${levels.length > 1 ? 's' : ''}…`);
  const t0 = performance.now();
  const errors = await Promise.all(columns.map((column) => captionInto(column, request)));
  if (state.run !== run) return; // replaced by a newer comparison: it owns the page now
  state.run = null;
  setRunning(false);
  markDifferences(columns, state.vocabulary, state.image?.truth ? new Set(state.image.truth) : null);
  const failed = errors.filter((e) => e !== null);
  setStatus(`${columns.length - failed.length} of ${columns.length} caption${columns.length > 1 ? 's' : ''} in ${seconds(performance.now() - t0)}.`);
  if (failed.some((e) => e instanceof PlaygroundError && e.status === 401)) {
    askForKey(failed.find((e) => e.status === 401).message);
  } else if (failed.length && !failed.every((e) => e === 'stopped')) {
    const messages = [...new Set(failed.map((e) => failureMessage(e, timeoutS)))];
    showAlert(messages.join(' '));
  }
  // For tests and scripts: one more comparison has finished, its marks and messages included.
  document.body.dataset.runs = String(Number(document.body.dataset.runs ?? 0) + 1);
}

// ------------------------------------------------------------------------------------------- start
async function main() {
  try {
    const [config, vocabulary] = await Promise.all([getJSON('playground/config.json'), getJSON('playground/vocabulary.json')]);
    state.config = config;
    state.vocabulary = new Vocabulary(vocabulary.objects);
  } catch (err) {
    showAlert(`Could not load the page's settings from the server (${err.message}). Reload the page to try again.`);
    return;
  }
  $('model-line').textContent = `Model: ${state.config.model}`;
  $('prompt').value = state.config.default_prompt;
  $('max-tokens').value = String(state.config.default_max_tokens);
  $('max-tokens').max = String(state.config.max_tokens_limit);
  setUpImageInput();
  setUpLevels(state.config.presets, state.config.default_levels, () => {
    if (state.image) compare();
  });
  setUpKey();
  $('controls').addEventListener('submit', (e) => {
    e.preventDefault();
    compare();
  });
  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      compare();
    }
  });
  $('stop').addEventListener('click', () => state.run?.controller.abort('stopped'));
  await setUpSamples();
  document.body.dataset.ready = 'true'; // for tests and scripts: the page is wired up
}

main();
