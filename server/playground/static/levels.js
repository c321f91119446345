// The levels to compare: an editable list (each a number in [0, 1] with a preset menu) or, in single mode,
// one slider. Presets come from the server: the served model's knob map names them.

const MAX_LEVELS = 5;
const $ = (id) => document.getElementById(id);

let presets = {};
let nextId = 1;

/** "Balanced" for the level a preset stands for, else null. */
export function presetName(level) {
  const found = Object.entries(presets).find(([, value]) => value === level);
  return found ? found[0][0].toUpperCase() + found[0].slice(1) : null;
}

function addLevel(value) {
  const list = $('levels');
  if (list.children.length >= MAX_LEVELS) return;
  const id = nextId++;
  const item = document.createElement('li');
  item.className = 'level';
  const label = document.createElement('label');
  label.htmlFor = `level-${id}`;
  const input = document.createElement('input');
  Object.assign(input, { id: `level-${id}`, type: 'number', min: '0', max: '1', step: '0.05', value: String(value) });
  input.inputMode = 'decimal';
  const presetLabel = document.createElement('label');
  presetLabel.htmlFor = `preset-${id}`;
  presetLabel.className = 'visually-hidden';
  const select = document.createElement('select');
  select.id = `preset-${id}`;
  select.append(new Option('custom', ''));
  for (const level of Object.values(presets)) {
    select.append(new Option(presetName(level), String(level)));
  }
  const syncPreset = () => {
    select.value = presetName(Number(input.value)) !== null && input.value !== '' ? String(Number(input.value)) : '';
  };
  select.addEventListener('change', () => {
    if (select.value !== '') input.value = select.value;
  });
  input.addEventListener('input', syncPreset);
  const remove = document.createElement('button');
  remove.type = 'button';
  remove.className = 'remove';
  remove.textContent = '×';
  remove.addEventListener('click', () => {
    const next = item.nextElementSibling?.querySelector('input') ?? item.previousElementSibling?.querySelector('input');
    item.remove();
    renumber();
    next?.focus(); // keep keyboard focus in the list rather than dropping it on <body>
  });
  item.append(label, input, presetLabel, select, remove);
  list.append(item);
  syncPreset();
  renumber();
}

// Labels say the position, so they are renumbered when a level is removed.
function renumber() {
  const items = [...$('levels').children];
  items.forEach((item, i) => {
    const [label, , presetLabel, , remove] = item.children;
    label.textContent = `Level ${i + 1}`;
    presetLabel.textContent = `Preset for level ${i + 1}`;
    remove.setAttribute('aria-label', `Remove level ${i + 1}`);
    remove.title = `Remove level ${i + 1}`;
    remove.disabled = items.length === 1;
  });
  $('add-level').disabled = items.length >= MAX_LEVELS;
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

/** {levels} to caption at, or {error, field} naming the first value that is not a number in [0, 1]. */
export function readLevels() {
  if (mode() === 'single') return { levels: [Number($('slider').value)] };
  const levels = [];
  for (const input of $('levels').querySelectorAll('input')) {
    const value = input.value === '' ? NaN : Number(input.value);
    if (!(value >= 0 && value <= 1)) {
      return { error: `${input.labels[0].textContent} must be a number from 0 to 1.`, field: input };
    }
    levels.push(value);
  }
  return { levels };
}

/** Fill the list with `defaults`; `onSlide` runs when the slider is released (single mode captions at once). */
export function setUpLevels(servedPresets, defaults, onSlide) {
  presets = servedPresets;
  for (const level of defaults) addLevel(level);
  $('add-level').addEventListener('click', () => {
    addLevel(presets.balanced ?? 0.5);
    $('levels').lastElementChild.querySelector('input').focus();
  });
  const showValue = () => {
    const level = Number($('slider').value);
    const name = presetName(level);
    $('slider-value').textContent = name ? `${level} (${name})` : String(level);
  };
  $('slider').addEventListener('input', showValue);
  $('slider').addEventListener('change', onSlide);
  showValue();
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener('change', () => {
      const single = mode() === 'single';
      $('compare-levels').hidden = single;
      $('single-level').hidden = !single;
      $('run').textContent = single ? 'Caption' : 'Compare';
    });
  }
}
