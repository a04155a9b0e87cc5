// The picture the model looks at: a file (picker or drag and drop) or a snapshot of the
// device's camera, re-encoded as a JPEG of at most 1024 pixels a side before it is sent
// (a phone's 12-megapixel photo is megabytes; the model sees 448 pixels a side at most).

const MAX_SIDE = 1024;
const QUALITY = 0.9;

/** A drawable (image bitmap or video) as JPEG bytes, scaled to fit MAX_SIDE. */
async function jpegOf(source, width, height) {
  const scale = Math.min(1, MAX_SIDE / Math.max(width, height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(width * scale));
  canvas.height = Math.max(1, Math.round(height * scale));
  canvas.getContext("2d").drawImage(source, 0, 0, canvas.width, canvas.height);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", QUALITY));
  if (!blob) throw new Error("the browser could not encode the picture");
  return { bytes: new Uint8Array(await blob.arrayBuffer()), blob };
}

/** A file the user picked or dropped: {bytes, blob, name}. A format the browser cannot
 * draw is sent as it is, for the server to read or refuse. */
export async function pictureFromFile(file) {
  try {
    const bitmap = await createImageBitmap(file);
    const out = await jpegOf(bitmap, bitmap.width, bitmap.height);
    bitmap.close?.();
    return { ...out, name: file.name };
  } catch {
    return { bytes: new Uint8Array(await file.arrayBuffer()), blob: file, name: file.name };
  }
}

/** The device camera, shown live in `video` until `snapshot()` or `close()`. */
export class Camera {
  static async open(video) {
    const stream = await navigator.mediaDevices.getUserMedia({
      video: {
        facingMode: { ideal: "environment" }, width: { ideal: 1280 }, height: { ideal: 960 },
      },
      audio: false,
    });
    video.srcObject = stream;
    video.muted = true;
    video.playsInline = true; // iOS: play inside the page, not full screen
    await video.play();
    return new Camera(video, stream);
  }

  constructor(video, stream) {
    this.video = video;
    this.stream = stream;
  }

  async snapshot() {
    const { videoWidth: w, videoHeight: h } = this.video;
    if (!w || !h) throw new Error("the camera has not given a picture yet");
    return { ...(await jpegOf(this.video, w, h)), name: "camera snapshot" };
  }

  close() {
    for (const track of this.stream.getTracks()) track.stop();
    this.video.srcObject = null;
  }
}
