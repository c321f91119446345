// Files and sample scenes -> data URIs for the chat endpoint, which takes images as `data:image/...;base64,`.

// The server accepts these formats; it reads the media type of the data URI, so it must be right even when
// the file's name has no extension (the browser then reports no type) or the wrong one.
const SIGNATURES = [
  ['image/png', [0x89, 0x50, 0x4e, 0x47]],
  ['image/jpeg', [0xff, 0xd8, 0xff]],
  ['image/gif', [0x47, 0x49, 0x46, 0x38]],
  ['image/bmp', [0x42, 0x4d]],
];

function sniff(bytes) {
  for (const [type, magic] of SIGNATURES) {
    if (magic.every((b, i) => bytes[i] === b)) return type;
  }
  const ascii = (from, to) => String.fromCharCode(...bytes.slice(from, to));
  if (ascii(0, 4) === 'RIFF' && ascii(8, 12) === 'WEBP') return 'image/webp';
  return null;
}

function asDataUri(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error ?? new Error('the file could not be read'));
    reader.readAsDataURL(blob);
  });
}

async function decodable(dataUri) {
  const img = new Image();
  img.src = dataUri;
  try {
    await img.decode();
    return true;
  } catch {
    return false;
  }
}

/**
 * A picked or dropped file as a data URI with the media type its first bytes say, and whether the browser
 * can show it. A file that is not an image keeps its own type: the server refuses it, and the page says why.
 */
export async function readImageFile(file) {
  const head = new Uint8Array(await file.slice(0, 12).arrayBuffer());
  const type = sniff(head) ?? (file.type || 'application/octet-stream');
  const dataUri = await asDataUri(new Blob([file], { type }));
  return { dataUri, isImage: await decodable(dataUri) };
}

export async function sampleImage(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`the sample answered ${response.status}`);
  return asDataUri(await response.blob());
}
