-- Up Migration
-- Baseline of an orchestra's own database (the orchestra app's tables).
-- Never applied to the central database: the control plane refuses to start
-- if it finds these tables there.

CREATE TABLE instruments (
  id serial PRIMARY KEY,
  name text NOT NULL UNIQUE,
  section text NOT NULL CHECK (section IN ('strings', 'woodwinds', 'brass', 'percussion', 'keyboards', 'other'))
);

CREATE TABLE positions (
  id serial PRIMARY KEY,
  instrument_id integer NOT NULL REFERENCES instruments (id),
  name text NOT NULL,
  hierarchy integer NOT NULL DEFAULT 0,
  UNIQUE (instrument_id, name)
);

CREATE TABLE musicians (
  id serial PRIMARY KEY,
  first_name text NOT NULL,
  last_name text NOT NULL,
  email text NOT NULL UNIQUE,
  phone text,
  active boolean NOT NULL DEFAULT true,
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projects (
  id serial PRIMARY KEY,
  name text NOT NULL,
  start_date date NOT NULL,
  end_date date,
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rankings (
  id serial PRIMARY KEY,
  position_id integer NOT NULL REFERENCES positions (id),
  musician_id integer NOT NULL REFERENCES musicians (id),
  rank integer NOT NULL CHECK (rank > 0),
  UNIQUE (position_id, musician_id)
);

CREATE TABLE requests (
  id serial PRIMARY KEY,
  project_id integer NOT NULL REFERENCES projects (id),
  position_id integer NOT NULL REFERENCES positions (id),
  musician_id integer NOT NULL REFERENCES musicians (id),
  status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'accepted', 'declined', 'expired')),
  sent_at timestamptz NOT NULL DEFAULT now(),
  answered_at timestamptz
);

-- Down Migration
DROP TABLE requests;
DROP TABLE rankings;
DROP TABLE projects;
DROP TABLE musicians;
DROP TABLE positions;
DROP TABLE instruments;
